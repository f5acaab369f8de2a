"""The training loop: small on purpose.

Per step: the frozen teacher runs outside ``autograd.record()`` (inference only); inside it,
the student's logits go through every loss term of the recipe, weighted and summed. After each
epoch: evaluation, tensorboardX scalars, an atomic checkpoint. A killed run resumes from its
last complete epoch with the same result as an uninterrupted one: the batch order and MXNet's
RNG are derived from ``(seed, epoch)``, and parameters and optimizer state are checkpointed.
"""
import logging
import math
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import UserError
from . import optim  # noqa: F401  (registers deterministicnag)

__all__ = ["fit", "evaluate", "predict", "lr_at", "Modifier", "Term", "Trainable", "augment_batch",
           "TrainingDiverged"]
_LOGGER = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A NaN or Inf loss: the run stops, the last good checkpoint is kept."""


def lr_at(cfg, epoch_float):
    """Learning rate at fractional epoch ``epoch_float`` (warm-up, then cosine / step / constant)."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-8) / cfg.warmup_epochs
    if cfg.lr_schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        prog = min(max((epoch_float - cfg.warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * prog))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_factor ** sum(1 for s in cfg.lr_steps if epoch_float >= s)
    return cfg.lr


def _batches(n, batch_size, rng=None, drop_last=False):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if (drop_last and n > batch_size) else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def predict(net, x, batch_size=256):
    """Logits of ``net`` on the numpy array ``x`` (N, C, H, W), as a numpy array (N, K)."""
    outs = []
    for idx in _batches(len(x), batch_size):
        outs.append(net(mx.nd.array(x[idx])).asnumpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), "float32")


def evaluate(net, split, batch_size=256):
    """Top-1 accuracy in percent of ``net`` on a labelled :class:`~distill.data.Split`."""
    if split.y is None or len(split.y) == 0:
        return float("nan")
    logits = predict(net, split.x, batch_size)
    return float((logits.argmax(1) == split.y).mean() * 100.0)


def _make_trainer(net, cfg):
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):   # no weight decay on BN affine and biases
            p.wd_mult = 0.0
    if cfg.optimizer == "adam":
        opt, kw = "adam", {}
    else:
        opt = "deterministicnag" if cfg.optimizer == "nesterov" else "sgd"
        kw = {"momentum": cfg.momentum}
    return gluon.Trainer(net.collect_params(), opt,
                         {"learning_rate": cfg.lr, "wd": cfg.weight_decay, **kw}, kvstore=None)


class Modifier:
    """A unit that acts on the loop without living in it (SparseML's lifecycle, trimmed).

    Every hook is optional; the loop calls them in this order::

        initialize(net, trainer, data)         once, before the first epoch (and after resume)
        epoch_start(epoch)                     0-based epoch
        after_step(epoch, step, steps_per_epoch)   right after optimizer.step(): e.g. re-apply masks
        epoch_end(epoch, writer) -> dict       scalars to add to the epoch's history row
        state_dict() / load_state_dict(d)      saved in every checkpoint, restored on --resume

    Pruning schedules and mask keeping are modifiers.
    """

    name = "modifier"

    def initialize(self, net, trainer, data):
        pass

    def epoch_start(self, epoch):
        pass

    def after_step(self, epoch, step, steps_per_epoch):
        pass

    def epoch_end(self, epoch, writer):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Term:
    """One weighted loss term and where its inputs come from.

    ``s_idx``/``t_idx`` index the student's and teacher's output lists (0 = logits).
    """

    def __init__(self, name, weight, block, s_idx=0, t_idx=0):
        self.name, self.weight, self.block, self.s_idx, self.t_idx = name, weight, block, s_idx, t_idx


class Trainable(gluon.Block):
    """Everything the optimizer updates: the student and the loss terms' own parameters
    (e.g. hint adapters, dropped at export). Checkpoints save it by structural names."""

    def __init__(self, student, terms):
        super().__init__()
        self.student = student
        for i, t in enumerate(terms):
            self.register_child(t.block, f"term{i}")


def augment_batch(x, ops, rng):
    """Random ``crop`` (pad by 1/8 of the size, reflect, crop back) and ``hflip`` of (N, C, H, W)."""
    if "crop" in ops:
        n, _, h, w = x.shape
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="reflect")
        dy, dx = rng.randint(0, 2 * ph + 1, n), rng.randint(0, 2 * pw + 1, n)
        x = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if "hflip" in ops:
        flip = rng.rand(len(x)) < 0.5
        x = x.copy()
        x[flip] = x[flip, :, :, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32)


def fit(student, train_net, teacher_outputs, data, terms, cfg, run_dir, writer, resume=False,
        recipe_dict=None, log=print, modifiers=(), augment=()):
    """Train ``student`` on ``data`` with the weighted loss ``terms``.

    Parameters
    ----------
    student : gluon.HybridBlock
        Initialized student (logits only): what is evaluated, checkpointed and exported.
    train_net : gluon.HybridBlock
        ``student`` itself, or a block sharing its parameters that returns ``[logits] + taps``.
    teacher_outputs : TeacherOutputs or None
        ``teacher_outputs(idx, x)`` → the frozen teacher's ``[logits] + taps`` for a batch,
        computed outside ``autograd.record()`` (live or cached).
    data : DataBundle
    terms : list of Term
    cfg : TrainerConfig
    run_dir : str
        Checkpoints go to ``run_dir/checkpoints``.
    writer : tensorboardX.SummaryWriter
    modifiers : list of Modifier
        Hooks (pruning, mask keeping) called around each step and epoch.
    augment : list of str
        Random train-batch augmentation (``crop``, ``hflip``), seeded by (seed, epoch).

    Returns
    -------
    dict
        ``{"history": [...per-epoch metrics], "train_time_s": float}``.
    """
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    owner = Trainable(student, terms)
    trainer = _make_trainer(owner, cfg)
    history, start, prior_time = [], 0, 0.0
    labelled = data.train.y is not None
    if any(t.block.needs_labels for t in terms) and not labelled:
        raise UserError("distillation: a `ce` term needs labels but the data have none "
                        "(`data.labels: false`): drop the `ce` term or provide labels.")
    # parameters must exist (deferred init) before checkpoints, optimizer state or modifiers
    train_net(mx.nd.array(data.train.x[:1]))
    if resume:
        path = latest_checkpoint(ckpt_dir)
        if path:
            payload = load_checkpoint(path, owner, trainer)
            for m in modifiers:
                m.load_state_dict(payload.get("modifiers", {}).get(m.name, {}))
            start, history = payload["epoch"] + 1, payload["history"]
            prior_time = payload.get("train_time_s", 0.0)
            if start < cfg.epochs:
                log(f"resumed from {path}: continuing at epoch {start + 1}/{cfg.epochs}")
            else:
                log(f"resumed from {path}: all {cfg.epochs} epochs were already done")
    need_teacher = teacher_outputs is not None and any(t.block.needs_teacher for t in terms)
    n = len(data.train.x)
    steps_per_epoch = max(1, len(range(0, n - n % cfg.batch_size if n > cfg.batch_size else n, cfg.batch_size)))
    t_start = time.time()
    for m in modifiers:
        m.initialize(student, trainer, data)
    for epoch in range(start, cfg.epochs):
        for m in modifiers:
            m.epoch_start(epoch)
        rng = np.random.RandomState(cfg.seed * 100003 + epoch)
        mx.random.seed(cfg.seed * 100003 + epoch)
        sums = {t.name: 0.0 for t in terms}
        total_sum, correct, seen = 0.0, 0, 0
        t0 = time.time()
        bar = tqdm(_batches(n, cfg.batch_size, rng, drop_last=True), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=None if cfg.progress else True, dynamic_ncols=True)  # None: off when not a TTY
        for step, idx in enumerate(bar):
            lr = lr_at(cfg, epoch + step / steps_per_epoch)
            trainer.set_learning_rate(lr)
            xb = data.train.x[idx]
            if augment:
                xb = augment_batch(xb, augment, rng)
            x = mx.nd.array(xb)
            y = mx.nd.array(data.train.y[idx]) if labelled else None
            t_out = teacher_outputs(idx, x) if need_teacher else None
            with autograd.record():
                outs = train_net(x)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                parts = [(t, t.block(outs[t.s_idx], y, t_out[t.t_idx] if t_out else None).mean())
                         for t in terms]
                loss = mx.nd.add_n(*[t.weight * v for t, v in parts]) if len(parts) > 1 \
                    else parts[0][0].weight * parts[0][1]
            loss.backward()
            trainer.step(1)
            for m in modifiers:
                m.after_step(epoch, step, steps_per_epoch)
            values = {t.name: float(v.asscalar()) for t, v in parts}
            total = float(loss.asscalar())
            if not np.isfinite(total):
                bad = [name for name, v in values.items() if not np.isfinite(v)] or ["total"]
                raise TrainingDiverged(
                    f"loss became {total} at epoch {epoch + 1}, step {step + 1} (loss term "
                    f"{', '.join(bad)}). The run stopped; the last good checkpoint in {ckpt_dir} is "
                    f"kept. Lower `trainer.lr` (now {cfg.lr}) or add `trainer.warmup_epochs`.")
            for name in sums:
                sums[name] += values[name] * len(idx)
            total_sum += total * len(idx)
            if labelled:
                correct += int((outs[0].argmax(axis=1) == y).sum().asscalar())
            seen += len(idx)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.4f}")
        bar.close()
        elapsed = time.time() - t0
        val_top1 = evaluate(student, data.val, cfg.eval_batch_size)
        row = {"epoch": epoch + 1, "lr": lr, "loss": total_sum / seen,
               "losses": {k: v / seen for k, v in sums.items()},
               "train_top1": correct / seen * 100.0 if labelled else None,
               "val_top1": val_top1, "images_per_s": seen / elapsed, "epoch_time_s": elapsed}
        for m in modifiers:
            row.update(m.epoch_end(epoch, writer) or {})
        history.append(row)
        step_no = epoch + 1
        for k, v in row["losses"].items():
            writer.add_scalar(f"loss/{k}", v, step_no)
        writer.add_scalar("loss/total", row["loss"], step_no)
        writer.add_scalar("lr", lr, step_no)
        if labelled:
            writer.add_scalar("top1/train", row["train_top1"], step_no)
        writer.add_scalar("top1/val", val_top1, step_no)
        writer.add_scalar("speed/images_per_s", row["images_per_s"], step_no)
        writer.flush()
        save_checkpoint(ckpt_dir, epoch, owner, trainer,
                        {"history": history, "recipe": recipe_dict,
                         "modifiers": {m.name: m.state_dict() for m in modifiers},
                         "train_time_s": prior_time + time.time() - t_start})
        train_txt = f"train {row['train_top1']:.2f}%  " if labelled else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  "
            + "  ".join(f"{k} {v:.4f}" for k, v in row["losses"].items())
            + f"  {train_txt}val {val_top1:.2f}%  {row['images_per_s']:.0f} img/s")
    return {"history": history, "train_time_s": prior_time + time.time() - t_start}
