"""The training loop: small on purpose.

Per step: the frozen teacher runs outside ``autograd.record()`` (inference only); inside it,
the student's logits go through every loss term of the recipe, weighted and summed. After each
epoch: evaluation, tensorboardX scalars, an atomic checkpoint. A killed run resumes from its
last complete epoch with the same result as an uninterrupted one: the batch order and MXNet's
RNG are derived from ``(seed, epoch)``, and parameters and optimizer state are checkpointed.

With a ``dist_sync`` :class:`~distill.distributed.Cluster` the same loop runs on every worker
over its own shard: the KVStore sums the gradients (averaged here), every worker applies the
same update, BatchNorm statistics are averaged per epoch and pruning masks are rank 0's.
"""
import itertools
import logging
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint
from .distributed import Cluster
from .errors import UserError
from .modifier import LoopState, Modifier
from . import nag  # noqa: F401  (registers deterministicnag with MXNet)
from .optim import lr_at, optimizer_spec

__all__ = ["fit", "evaluate", "predict", "lr_at", "Modifier", "Term", "Trainable", "augment_batch",
           "TrainingDiverged"]
_LOGGER = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """A NaN or Inf loss: the run stops, the last good checkpoint is kept."""


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


def _make_trainer(net, cfg, cluster):
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):   # no weight decay on BN affine and biases
            p.wd_mult = 0.0
    opt, kw = optimizer_spec(cfg)
    extra = {} if cluster.update_on_kvstore() is None else {"update_on_kvstore": cluster.update_on_kvstore()}
    return gluon.Trainer(net.collect_params(), opt,
                         {"learning_rate": cfg.lr, "wd": cfg.weight_decay, **kw},
                         kvstore=cluster.trainer_kvstore(), **extra)


def _running_stats(net):
    """Parameters no gradient updates (BatchNorm running mean/var): averaged over workers."""
    return {n: p for n, p in net.collect_params().items() if p.grad_req == "null"}


def _sync_masks(cluster, modifiers, synced):
    """Every worker takes rank 0's pruning masks after a mask update. With ``dist_sync`` the
    weights, hence magnitude criteria, agree anyway; a criterion that reads the worker's own
    data (``taylor``'s calibration pass on its shard) would not. Logged when they differed.

    ``synced`` maps a modifier's position to the masks object last synchronized (a mask update
    replaces the object, so only new masks travel)."""
    if not cluster.synchronous:
        return
    for i, m in enumerate(modifiers):
        masks = getattr(m, "masks", None)
        if not masks or synced.get(i) is masks:
            continue
        got = cluster.broadcast({k: v.astype(np.float32) for k, v in masks.items()})
        differ = sorted(k for k in masks if not np.array_equal(masks[k], got[k] > 0.5))
        if differ:
            _LOGGER.warning("rank %d: its own pruning masks differed from rank 0's on %d "
                            "parameter(s) (%s): using rank 0's", cluster.rank, len(differ),
                            ", ".join(differ[:3]))
        m.set_masks({k: got[k] > 0.5 for k in masks})
        synced[i] = m.masks


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


def fit(student, train_net, teacher_outputs, data, terms, cfg, checkpoints=None, resume=False,
        log=print, modifiers=(), augment=(), cluster=None, trust_checkpoint=False):
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
    checkpoints : str or None
        The checkpoints folder (written by the :class:`~distill.recorders.Checkpointer` modifier).
    resume : bool
        Continue from the newest complete checkpoint in ``checkpoints``, if any.
    modifiers : list of Modifier
        Hooks around each step and epoch: pruning, mask keeping, and the recorders (console
        log, tensorboard, checkpoint: :mod:`distill.recorders`), in that order.
    augment : list of str
        Random train-batch augmentation (``crop``, ``hflip``), seeded by (seed, epoch).
    cluster : Cluster or None
        The workers of a ``dist_*`` run (:mod:`distill.distributed`); None: this process alone.
        ``data.train`` is then this worker's shard; gradients are averaged over workers
        (``trainer.batch_size`` is per worker), BatchNorm running statistics are averaged at
        every epoch end, pruning masks are rank 0's, and only rank 0 evaluates.
    trust_checkpoint : bool
        With ``resume``: also load a checkpoint of the old pickle format (``--trust-checkpoint``;
        unpickling runs any code the file holds, see :mod:`distill.checkpoint`).

    Returns
    -------
    dict
        ``{"history": [...per-epoch metrics], "train_time_s": float}``.
    """
    cluster = cluster or Cluster()
    owner = Trainable(student, terms)
    trainer = _make_trainer(owner, cfg, cluster)
    history, start, prior_time = [], 0, 0.0
    labelled = data.train.y is not None
    needy = [t for t in terms if t.block.needs_labels]
    if needy and not labelled:      # the recipe refuses this first; a direct caller gets the same
        raise UserError("distillation: " + needy[0].block.without_labels(needy[0].name))
    # parameters must exist (deferred init) before checkpoints, optimizer state or modifiers
    train_net(mx.nd.array(data.train.x[:1]))
    path = latest_checkpoint(checkpoints, clean=cluster.is_root) if resume and checkpoints else None
    init_kv = (lambda: cluster.init_trainer(trainer)) if cluster.distributed else None
    if path:
        payload = load_checkpoint(path, owner, trainer, before_states=init_kv, trust=trust_checkpoint)
        for m in modifiers:
            m.load_state_dict(payload.get("modifiers", {}).get(m.name, {}))
        start, history = payload["epoch"] + 1, payload["history"]
        prior_time = payload.get("train_time_s", 0.0)
        if start < cfg.epochs:
            log(f"resumed from {path}: continuing at epoch {start + 1}/{cfg.epochs}")
        else:
            log(f"resumed from {path}: all {cfg.epochs} epochs were already done")
    elif init_kv:
        init_kv()
    need_teacher = teacher_outputs is not None and any(t.block.needs_teacher for t in terms)
    n = len(data.train.x)
    steps_per_epoch = max(1, len(range(0, n - n % cfg.batch_size if n > cfg.batch_size else n, cfg.batch_size)))
    steps_per_epoch = cluster.min_int(steps_per_epoch)   # a dist_sync step waits for every worker
    t_start = time.time()
    loop = LoopState(owner, trainer, list(modifiers), history, cfg, labelled,
                     lambda: prior_time + time.time() - t_start)
    for m in modifiers:
        m.initialize(student, trainer, data)
    synced = {}
    for epoch in range(start, cfg.epochs):
        for m in modifiers:
            m.epoch_start(epoch)
        for t in terms:             # a term's own schedule (dkd's warm-up) follows the epoch
            t.block.set_epoch(epoch)
        _sync_masks(cluster, modifiers, synced)
        rng = np.random.RandomState(cfg.seed * 100003 + epoch)
        mx.random.seed(cfg.seed * 100003 + epoch)
        t0 = time.time()
        sums, seen, correct, lr = _train_epoch(train_net, trainer, teacher_outputs if need_teacher else None,
                                               data, terms, cfg, epoch, steps_per_epoch, rng,
                                               modifiers, augment, labelled, checkpoints,
                                               cluster.num_workers if cluster.synchronous else 1)
        elapsed = time.time() - t0
        cluster.average(_running_stats(owner))
        val_top1 = evaluate(student, data.val, cfg.eval_batch_size) if cluster.is_root else float("nan")
        total_sum = sums.pop("__total__")
        row = {"epoch": epoch + 1, "lr": lr, "loss": total_sum / seen,
               "losses": {k: v / seen for k, v in sums.items()},
               "train_top1": correct / seen * 100.0 if labelled else None,
               "val_top1": val_top1, "images_per_s": seen / elapsed, "epoch_time_s": elapsed}
        for m in modifiers:
            row.update(m.epoch_end(epoch) or {})
        history.append(row)
        for m in modifiers:
            m.record(epoch, row, loop)
    return {"history": history, "train_time_s": prior_time + time.time() - t_start}


def _train_epoch(train_net, trainer, teacher_outputs, data, terms, cfg, epoch, steps_per_epoch,
                 rng, modifiers, augment, labelled, checkpoints, grad_divisor=1):
    """One epoch of steps → (per-term loss sums incl. ``__total__``, images, correct, last lr).

    ``grad_divisor``: the number of ``dist_sync`` workers, whose gradients the KVStore sums:
    dividing averages them, so ``trainer.lr`` means what it means for one process whose batch
    is the global one (workers × ``trainer.batch_size``).

    The run hands in hybridized loss terms (one cached graph each instead of a handful of
    imperative ops per step): with the teacher's outputs cached, that is most of a KD step's cost.
    """
    ckpt_hint = f"the last good checkpoint in {checkpoints} is kept" if checkpoints else \
        "no checkpoint was written"
    n = len(data.train.x)
    sums = {t.name: 0.0 for t in terms}
    total_sum, correct, seen, lr = 0.0, 0, 0, cfg.lr
    # islice: a worker's shard may hold more batches than the steps every worker can take
    bar = tqdm(itertools.islice(_batches(n, cfg.batch_size, rng, drop_last=True), steps_per_epoch),
               total=steps_per_epoch,
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
        t_out = teacher_outputs(idx, x) if teacher_outputs is not None else None
        with autograd.record():
            outs = train_net(x)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            parts = [(t, t.block(outs[t.s_idx], y, t_out[t.t_idx] if t_out else None).mean())
                     for t in terms]
            loss = mx.nd.add_n(*[t.weight * v for t, v in parts]) if len(parts) > 1 \
                else parts[0][0].weight * parts[0][1]
        loss.backward()
        trainer.step(grad_divisor)
        for m in modifiers:
            m.after_step(epoch, step, steps_per_epoch)
        values = {t.name: float(v.asscalar()) for t, v in parts}
        total = float(loss.asscalar())
        if not np.isfinite(total):
            bad = [name for name, v in values.items() if not np.isfinite(v)] or ["total"]
            raise TrainingDiverged(
                f"loss became {total} at epoch {epoch + 1}, step {step + 1} (loss term "
                f"{', '.join(bad)}). The run stopped; {ckpt_hint}. Lower `trainer.lr` (now "
                f"{cfg.lr}) or add `trainer.warmup_epochs`.")
        for name in sums:
            sums[name] += values[name] * len(idx)
        total_sum += total * len(idx)
        if labelled:
            correct += int((outs[0].argmax(axis=1) == y).sum().asscalar())
        seen += len(idx)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.4f}")
    bar.close()
    sums["__total__"] = total_sum
    return sums, seen, correct, lr
