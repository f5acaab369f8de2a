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

__all__ = ["fit", "evaluate", "predict", "lr_at", "TrainingDiverged"]
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


def fit(student, teacher, data, terms, cfg, run_dir, writer, resume=False, recipe_dict=None,
        log=print):
    """Train ``student`` on ``data`` with the weighted loss ``terms``.

    Parameters
    ----------
    student : gluon.HybridBlock
        Initialized, hybridized student.
    teacher : Teacher or None
        Frozen teacher, called outside ``autograd.record()``.
    data : DataBundle
    terms : list of (str, float, LossTermBlock)
        ``(name, weight, block)`` per recipe loss term.
    cfg : TrainerConfig
    run_dir : str
        Checkpoints go to ``run_dir/checkpoints``.
    writer : tensorboardX.SummaryWriter

    Returns
    -------
    dict
        ``{"history": [...per-epoch metrics], "train_time_s": float}``.
    """
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    trainer = _make_trainer(student, cfg)
    history, start, prior_time = [], 0, 0.0
    if resume:
        path = latest_checkpoint(ckpt_dir)
        if path:
            # the optimizer state needs initialized arrays: one step-less forward is enough
            student(mx.nd.array(data.train.x[:1]))
            payload = load_checkpoint(path, student, trainer)
            start, history = payload["epoch"] + 1, payload["history"]
            prior_time = payload.get("train_time_s", 0.0)
            if start < cfg.epochs:
                log(f"resumed from {path}: continuing at epoch {start + 1}/{cfg.epochs}")
            else:
                log(f"resumed from {path}: all {cfg.epochs} epochs were already done")
    need_teacher = any(t.needs_teacher for _, _, t in terms) and teacher is not None
    need_labels = any(t.needs_labels for _, _, t in terms)
    if need_labels and data.train.y is None:
        raise UserError("distillation: a `ce` term needs labels but the data have none "
                        "(`data.labels: false`): drop the `ce` term or provide labels.")
    n = len(data.train.x)
    steps_per_epoch = max(1, len(range(0, n - n % cfg.batch_size if n > cfg.batch_size else n, cfg.batch_size)))
    t_start = time.time()
    for epoch in range(start, cfg.epochs):
        rng = np.random.RandomState(cfg.seed * 100003 + epoch)
        mx.random.seed(cfg.seed * 100003 + epoch)
        sums = {name: 0.0 for name, _, _ in terms}
        total_sum, correct, seen = 0.0, 0, 0
        t0 = time.time()
        bar = tqdm(_batches(n, cfg.batch_size, rng, drop_last=True), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not cfg.progress, dynamic_ncols=True)
        for step, idx in enumerate(bar):
            lr = lr_at(cfg, epoch + step / steps_per_epoch)
            trainer.set_learning_rate(lr)
            x = mx.nd.array(data.train.x[idx])
            y = mx.nd.array(data.train.y[idx]) if data.train.y is not None else None
            t_out = teacher(x) if need_teacher else None
            with autograd.record():
                out = student(x)
                parts = [(name, w, term(out, y, t_out).mean()) for name, w, term in terms]
                loss = mx.nd.add_n(*[w * v for _, w, v in parts]) if len(parts) > 1 else parts[0][1] * parts[0][2]
            loss.backward()
            trainer.step(1)
            values = {name: float(v.asscalar()) for name, _, v in parts}
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
            if y is not None:
                correct += int((out.argmax(axis=1) == y).sum().asscalar())
            seen += len(idx)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.4f}")
        bar.close()
        elapsed = time.time() - t0
        val_top1 = evaluate(student, data.val, cfg.eval_batch_size)
        row = {"epoch": epoch + 1, "lr": lr, "loss": total_sum / seen,
               "losses": {k: v / seen for k, v in sums.items()},
               "train_top1": correct / seen * 100.0 if data.train.y is not None else float("nan"),
               "val_top1": val_top1, "images_per_s": seen / elapsed, "epoch_time_s": elapsed}
        history.append(row)
        step_no = epoch + 1
        for k, v in row["losses"].items():
            writer.add_scalar(f"loss/{k}", v, step_no)
        writer.add_scalar("loss/total", row["loss"], step_no)
        writer.add_scalar("lr", lr, step_no)
        writer.add_scalar("top1/train", row["train_top1"], step_no)
        writer.add_scalar("top1/val", val_top1, step_no)
        writer.add_scalar("speed/images_per_s", row["images_per_s"], step_no)
        writer.flush()
        save_checkpoint(ckpt_dir, epoch, student, trainer,
                        {"history": history, "recipe": recipe_dict,
                         "train_time_s": prior_time + time.time() - t_start})
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  "
            + "  ".join(f"{k} {v:.4f}" for k, v in row["losses"].items())
            + f"  train {row['train_top1']:.2f}%  val {val_top1:.2f}%  {row['images_per_s']:.0f} img/s")
    return {"history": history, "train_time_s": prior_time + time.time() - t_start}
