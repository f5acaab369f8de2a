"""The training loop: small on purpose.

Per step: the frozen teacher runs outside ``autograd.record()`` (inference only); inside it,
the student's logits go through every loss term of the recipe, weighted and summed. After each
epoch: evaluation, tensorboardX scalars, an atomic checkpoint (and every
``trainer.checkpoint_every`` steps one mid-epoch). A killed run resumes from its last checkpoint
with the same result as an uninterrupted one: the batch order, the augmentation and MXNet's RNG
are derived from ``(seed, epoch)`` (and the step, with ``checkpoint_every``), and parameters,
optimizer state and the epoch's running sums are checkpointed.

The loop does not wait for the device at every step: loss values and the accuracy stay on the
device and are read back every :data:`SYNC_EVERY` steps (and before a checkpoint), where a NaN
or Inf stops the run naming the step it appeared at. Batches are gathered (or decoded) ahead on
a background thread (:mod:`distill.feed`).

On several devices (``trainer.devices``, :mod:`distill.devices`) each batch is cut into one
slice per device; the student, its loss terms and a live teacher have a replica on each; each
slice's loss is weighted by its share of the batch, so the summed gradients are those of the
whole batch on one device; the replicas' BatchNorm statistics are averaged at every epoch end.
The parameters go back to the CPU when training ends (int8 calibration, latency and export run
there).

With a ``dist_sync`` :class:`~distill.distributed.Cluster` the same loop runs on every worker
over its own shard: the KVStore sums the gradients (averaged here), every worker applies the
same update, BatchNorm statistics are averaged per epoch and pruning masks are rank 0's.
"""
import logging
import sys
import time
import warnings
import weakref

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from . import devices as _devices
from .checkpoint import apply_checkpoint, latest_checkpoint, read_checkpoint
from .distributed import Cluster
from .errors import UserError
from .feed import EpochFeed, augment_batch, epoch_seed
from .graphnorm import relu_min_for_clip
from .modifier import LoopState, Modifier
from .replicas import sync_running_stats
from .taps import graph_of
from . import nag  # noqa: F401  (registers deterministicnag with MXNet)
from .optim import lr_at, optimizer_spec
from .rebuild import param_keys, swap_parts, transplant_optimizer

__all__ = ["fit", "evaluate", "predict", "eval_view", "lr_at", "Modifier", "Term", "Trainable", "augment_batch",
           "TrainingDiverged", "SYNC_EVERY"]
_LOGGER = logging.getLogger(__name__)

_AUG_DEFAULTS = {"min_random_area": 0.08, "jitter": 0.4, "pca_noise": 0.1}

# Steps between two reads of the loss back from the device (the NaN check, the progress bar).
SYNC_EVERY = 25


class TrainingDiverged(UserError):
    """A NaN or Inf loss: the run stops, the last good checkpoint is kept."""


def _batches(n, batch_size):
    for i in range(0, n, batch_size):
        yield np.arange(i, min(i + batch_size, n))


_EVAL_VIEWS = weakref.WeakKeyDictionary()


def eval_view(net):
    """What :func:`predict` runs for ``net``: ``net`` itself, or, when its graph has a
    ``clip(x, 0, M)`` (ReLU6, hard-swish), a SymbolBlock sharing ``net``'s parameters whose graph
    computes it as ``minimum(relu(x), M)`` (:func:`~distill.graphnorm.relu_min_for_clip`): the
    same logits, faster on the CPU (MobileNetV2-0.5, 256 images of 28 px: 183 vs 291 ms dense,
    53 vs 79 ms at 75% of its channels pruned). Built once per network; the shared parameters
    keep it current while ``net`` trains."""
    try:
        return _EVAL_VIEWS[net]
    except (KeyError, TypeError):
        pass
    view = net
    try:
        inputs = net._cached_graph[0] if isinstance(net, gluon.SymbolBlock) and net._cached_graph else None
        input_name = "data" if inputs is None else inputs[0].name if len(inputs) == 1 else None
        fast = relu_min_for_clip(graph_of(net, input_name)) \
            if isinstance(net, gluon.HybridBlock) and input_name else None
        if fast is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                view = gluon.SymbolBlock(fast, mx.sym.var(input_name), params=net.collect_params())
            view.hybridize(static_alloc=True, static_shape=True)
    except (mx.base.MXNetError, AssertionError, ValueError) as e:   # an unusual graph: run it as is
        _LOGGER.debug("eval_view: %s; evaluating the network as it is", e)
        view = net
    try:
        _EVAL_VIEWS[net] = view
    except TypeError:
        pass
    return view


def predict(net, x, batch_size=256, ctx=None, fast=False):
    """Logits of ``net`` on the images ``x`` (N, C, H, W), as a numpy array (N, K).

    ``x`` is a numpy array or a streamed split's images: read ``batch_size`` at a time.
    ``ctx``: the device the net's parameters are on (default: the CPU). ``fast``: run
    :func:`eval_view` (an fp32 network's graph, e.g. the student's evaluation while it trains)."""
    outs = []
    net = eval_view(net) if fast else net
    for idx in _batches(len(x), batch_size):
        outs.append(net(mx.nd.array(x[idx], ctx=ctx or mx.cpu())).asnumpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), "float32")


def evaluate(net, split, batch_size=256, ctx=None, fast=False):
    """Top-1 accuracy in percent of ``net`` on a labelled :class:`~distill.data.Split`
    (``fast``: :func:`predict`'s)."""
    if split.y is None or len(split.y) == 0:
        return float("nan")
    logits = predict(net, split.x, batch_size, ctx, fast)
    return float((logits.argmax(1) == split.y).mean() * 100.0)


def _make_trainer(net, cfg, cluster, ctxs):
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):   # no weight decay on BN affine and biases
            p.wd_mult = 0.0
    opt, kw = optimizer_spec(cfg)
    kv, update_on_kv = cluster.trainer_kvstore(), cluster.update_on_kvstore()
    if kv in (None, "device") and len(ctxs) > 1:
        # several devices in one process: the `device` kvstore sums the replicas' gradients;
        # each device then applies the same update with its own copy of the optimizer state
        # (identical on every replica, and checkpointed like a one-device run's). Not MXNet's
        # default update_on_kvstore=True: the store's own weight copy would undo in-place mask
        # writes, and set_data would reset its optimizer state (distill.replicas)
        kv, update_on_kv = "device", False
    extra = {} if update_on_kv is None else {"update_on_kvstore": update_on_kv}
    return gluon.Trainer(net.collect_params(), opt,
                         {"learning_rate": cfg.lr, "wd": cfg.weight_decay, **kw},
                         kvstore=kv, **extra)


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
        ``data.train.x`` a numpy array or streamed images (:mod:`distill.feed`).
    terms : list of Term
    cfg : TrainerConfig
        ``devices`` (data parallel over those devices), ``checkpoint_every`` (steps), ...
    checkpoints : str or None
        The checkpoints folder (written by the :class:`~distill.recorders.Checkpointer` modifier).
    resume : bool
        Continue from the newest complete checkpoint in ``checkpoints`` (an epoch's, or a
        mid-epoch one), if any.
    modifiers : list of Modifier
        Hooks around each step and epoch: pruning, mask keeping, and the recorders (console
        log, tensorboard, checkpoint: :mod:`distill.recorders`), in that order.
    augment : list of str
        ``data.augment``, seeded by (seed, epoch).
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
    ctxs = _devices.contexts(cfg.devices)
    owner = Trainable(student, terms)
    history, start, start_step, partial, prior_time = [], 0, 0, None, 0.0
    labelled = data.train.y is not None
    needy = [t for t in terms if t.block.needs_labels]
    if needy and not labelled:      # the recipe refuses this first; a direct caller gets the same
        raise UserError("distillation: " + needy[0].block.without_labels(needy[0].name))
    # parameters must exist (deferred init) before the devices, checkpoints, optimizer state
    # or modifiers
    train_net(mx.nd.array(data.train.x[:1]))
    need_teacher = teacher_outputs is not None and any(t.block.needs_teacher for t in terms)
    live_teacher = need_teacher and getattr(teacher_outputs, "arrays", None) is None
    moved = [owner] + ([teacher_outputs.teacher.net] if live_teacher else [])
    if not _devices.is_plain_cpu(ctxs):
        for block in moved:
            block.collect_params().reset_ctx(ctxs)
        log(f"training on {_devices.describe(ctxs)} (data parallel: {cfg.batch_size} images "
            f"per step cut into {len(ctxs)} slice(s)); evaluation on {ctxs[0]}")
    trainer = _make_trainer(owner, cfg, cluster, ctxs)
    path = latest_checkpoint(checkpoints, clean=cluster.is_root) if resume and checkpoints else None
    init_kv = (lambda: cluster.init_trainer(trainer)) if cluster.distributed else None
    loop = None

    def swap(rb):
        """Go on with the student a modifier rebuilt (smaller): :mod:`distill.rebuild`."""
        nonlocal student, train_net, owner, trainer
        old_keys = param_keys(owner, student)
        student, train_net, keeps = swap_parts(rb, student, train_net, terms)
        old_trainer, owner = trainer, Trainable(student, terms)
        if not _devices.is_plain_cpu(ctxs):
            owner.collect_params().reset_ctx(ctxs)
        trainer = _make_trainer(owner, cfg, cluster, ctxs)
        if not rb.resumed and rb.optimizer_state == "slice":
            transplant_optimizer(old_trainer, old_keys, trainer, param_keys(owner, student), keeps)
        moved[0] = owner
        if loop is not None:
            loop.owner, loop.trainer = owner, trainer
        for m in modifiers:
            m.rebind(student, trainer)

    def rebuild_if_asked():
        for m in modifiers:
            rb = m.take_rebuild()
            if rb is not None:
                swap(rb)

    if cluster.distributed:
        for m in modifiers:
            if getattr(m, "rebuilds", False):
                m.rebuilds = False
                log("pruning: `shrink: each_update` does not work with a dist_* kvstore (its servers "
                    "hold every array at its first shape): the student trains masked and is rebuilt "
                    "smaller at the end")
    payload = read_checkpoint(path, trust=trust_checkpoint) if path else None
    if payload is not None:
        for m in modifiers:
            m.load_state_dict(payload.get("modifiers", {}).get(m.name, {}))
    elif init_kv:
        init_kv()
    for m in modifiers:     # on the starting network (a resumed run too: as the first run did)
        m.initialize(student, trainer, data)
    if payload is not None:
        rebuild_if_asked()  # a student cut smaller before the checkpoint: its shapes first
        apply_checkpoint(payload, path, owner, trainer, before_states=init_kv)
        start, history = payload["epoch"] + 1, payload["history"]
        prior_time = payload.get("train_time_s", 0.0)
        partial = payload.get("partial")
        if partial:
            start_step = int(partial["step"])
        if start < cfg.epochs:
            at = f", step {start_step + 1}" if start_step else ""
            log(f"resumed from {path}: continuing at epoch {start + 1}/{cfg.epochs}{at}")
        else:
            log(f"resumed from {path}: all {cfg.epochs} epochs were already done")
    n = len(data.train.x)
    steps_per_epoch = max(1, len(range(0, n - n % cfg.batch_size if n > cfg.batch_size else n, cfg.batch_size)))
    steps_per_epoch = cluster.min_int(steps_per_epoch)   # a dist_sync step waits for every worker
    t_start = time.time()
    loop = LoopState(owner, trainer, list(modifiers), history, cfg, labelled,
                     lambda: prior_time + time.time() - t_start)
    synced = {}
    try:
        for epoch in range(start, cfg.epochs):
            for m in modifiers:
                m.epoch_start(epoch)
            rebuild_if_asked()
            for t in terms:             # a term's own schedule (dkd's warm-up) follows the epoch
                t.block.set_epoch(epoch)
            _sync_masks(cluster, modifiers, synced)
            mx.random.seed(epoch_seed(cfg.seed, epoch))
            run = _Epoch(train_net, trainer, teacher_outputs if need_teacher else None, data, terms,
                         cfg, epoch, steps_per_epoch, modifiers, augment, labelled, checkpoints,
                         cluster.num_workers if cluster.synchronous else 1, ctxs, loop,
                         partial if epoch == start else None)
            run.run()
            partial = None
            sync_running_stats(owner)           # the replicas' BatchNorm statistics, averaged
            cluster.average(_running_stats(owner))
            val_top1 = evaluate(student, data.val, cfg.eval_batch_size, ctxs[0], fast=True) \
                if cluster.is_root else float("nan")
            row = run.row(val_top1)
            for m in modifiers:
                row.update(m.epoch_end(epoch) or {})
            history.append(row)
            for m in modifiers:
                m.record(epoch, row, loop)
    finally:
        if not _devices.is_plain_cpu(ctxs):    # int8 calibration, latency and export: the CPU
            for block in moved:
                block.collect_params().reset_ctx(mx.cpu())
    return {"history": history, "train_time_s": prior_time + time.time() - t_start,
            "student": student}


class _Epoch:
    """One epoch of steps; its running sums (per-term loss, images, correct) survive a mid-epoch
    checkpoint (``partial``) so a resumed epoch reports what an uninterrupted one would.

    ``grad_divisor``: the number of ``dist_sync`` workers, whose gradients the KVStore sums:
    dividing averages them, so ``trainer.lr`` means what it means for one process whose batch
    is the global one (workers × ``trainer.batch_size``).

    The run hands in hybridized loss terms (one cached graph each instead of a handful of
    imperative ops per step): with the teacher's outputs cached, that is most of a KD step's cost.
    """

    def __init__(self, train_net, trainer, teacher_outputs, data, terms, cfg, epoch, steps,
                 modifiers, augment, labelled, checkpoints, grad_divisor, ctxs, loop, partial):
        self.net, self.trainer, self.teacher = train_net, trainer, teacher_outputs
        self.data, self.terms, self.cfg, self.epoch, self.steps = data, terms, cfg, epoch, steps
        self.modifiers, self.augment, self.labelled = modifiers, augment, labelled
        self.grad_divisor, self.ctxs, self.loop = grad_divisor, ctxs, loop
        self.ckpt_hint = f"the last good checkpoint in {checkpoints} is kept" if checkpoints else \
            "no checkpoint was written"
        p = partial or {}
        self.start_step = int(p.get("step", 0))
        self.sums = {t.name: float(p.get("sums", {}).get(t.name, 0.0)) for t in terms}
        self.total = float(p.get("total", 0.0))
        self.correct, self.seen = int(p.get("correct", 0)), int(p.get("seen", 0))
        self.dropped = int(p.get("dropped", 0))
        self.elapsed_before = float(p.get("elapsed", 0.0))
        self.lr = cfg.lr
        self.pending = []           # (step, [(n_k, [term values], total, correct)]) not yet read
        self.last_loss = None

    def partial(self):
        """The epoch so far, as plain data for a mid-epoch checkpoint."""
        return {"epoch": self.epoch, "step": self.step_done, "sums": dict(self.sums),
                "total": self.total, "correct": self.correct, "seen": self.seen,
                "dropped": self.dropped, "elapsed": self.elapsed_before + time.time() - self.t0}

    def run(self):
        cfg = self.cfg
        self.t0 = time.time()
        self.step_done = self.start_step
        every = cfg.checkpoint_every
        d = self.data
        feed = EpochFeed(d.train, cfg.batch_size, self.steps, cfg.seed, self.epoch, self.augment,
                         start_step=self.start_step, mean=d.mean, std=d.std,
                         options=getattr(d, "augment_options", None) or _AUG_DEFAULTS)
        bar = tqdm(total=self.steps * cfg.batch_size, initial=self.start_step * cfg.batch_size,
                   unit="img", unit_scale=False, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   leave=False, file=sys.stderr, disable=None if cfg.progress else True,
                   dynamic_ncols=True, smoothing=0.1)   # disable=None: off when not a TTY
        try:
            for batch in feed:
                if every:       # MXNet's RNG at each step: a mid-epoch resume continues it exactly
                    mx.random.seed(epoch_seed(cfg.seed, self.epoch) * 1000003 + batch.step)
                self.dropped += batch.dropped
                if len(batch.idx):
                    self._step(batch)
                self.step_done = batch.step + 1
                for m in self.modifiers:
                    m.after_step(self.epoch, batch.step, self.steps)
                if len(self.pending) >= SYNC_EVERY:
                    self._flush(bar)
                bar.update(len(batch.idx) + batch.dropped)
                if every and self.step_done % every == 0 and self.step_done < self.steps:
                    self._flush(bar)
                    # the replicas' BatchNorm statistics, averaged here too: a resumed run starts
                    # every replica from the one copy a checkpoint holds
                    sync_running_stats(self.loop.owner)
                    for m in self.modifiers:
                        m.mid_epoch(self.epoch, self.step_done, self.partial(), self.loop)
            self._flush(bar)
        finally:
            feed.close()
            bar.close()
        self.elapsed = self.elapsed_before + time.time() - self.t0

    def _step(self, batch):
        cfg, ctxs = self.cfg, self.ctxs
        self.lr = lr_at(cfg, self.epoch + batch.step / self.steps)
        self.trainer.set_learning_rate(self.lr)
        n = len(batch.idx)
        cuts = _devices.slices(n, len(ctxs))
        inputs = []
        for ctx, sl in zip(ctxs, cuts):     # the teacher runs outside autograd.record()
            x = mx.nd.array(batch.x[sl], ctx=ctx)
            y = mx.nd.array(batch.y[sl], ctx=ctx) if self.labelled else None
            t_out = None
            if self.teacher is not None:
                t_out = [o.as_in_context(ctx) for o in self.teacher(batch.idx[sl], x)]
            inputs.append((x, y, t_out, sl.stop - sl.start))
        results, losses = [], []
        with autograd.record():
            for x, y, t_out, n_k in inputs:
                outs = self.net(x)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                parts = [t.block(outs[t.s_idx], y, t_out[t.t_idx] if t_out else None).mean()
                         for t in self.terms]
                loss = mx.nd.add_n(*[t.weight * v for t, v in zip(self.terms, parts)]) \
                    if len(parts) > 1 else self.terms[0].weight * parts[0]
                # one device: the loss as always; several: each slice's share of the batch mean
                losses.append(loss if len(inputs) == 1 else loss * (n_k / n))
                results.append((n_k, parts, loss, outs[0], y))
        autograd.backward(losses)
        for m in self.modifiers:
            m.before_step(self.epoch, batch.step)
        self.trainer.step(self.grad_divisor)
        row = []
        for n_k, parts, loss, logits, y in results:
            correct = (logits.argmax(axis=1) == y.astype(logits.dtype)).sum() if self.labelled else None
            row.append((n_k, parts, loss, correct))
        self.pending.append((batch.step, row))

    def _flush(self, bar):
        """Read the pending steps' values back (one wait for the device), check them, sum them."""
        if not self.pending:
            return
        flat = []
        for _, row in self.pending:
            for n_k, parts, loss, correct in row:
                flat += parts + [loss] + ([correct] if correct is not None else [])
        values = mx.nd.concat(*[v.reshape((1,)) for v in flat], dim=0).asnumpy().astype(np.float64)
        pos = 0
        for step, row in self.pending:
            n = sum(r[0] for r in row)
            for n_k, parts, loss, correct in row:
                vals = values[pos:pos + len(parts)]
                total = values[pos + len(parts)]
                pos += len(parts) + 1
                if not np.isfinite(total):
                    bad = [t.name for t, v in zip(self.terms, vals) if not np.isfinite(v)] or ["total"]
                    self.pending = []
                    raise TrainingDiverged(
                        f"loss became {total} at epoch {self.epoch + 1}, step {step + 1} (loss term "
                        f"{', '.join(bad)}). The run stopped; {self.ckpt_hint}. Lower `trainer.lr` "
                        f"(now {self.cfg.lr}) or add `trainer.warmup_epochs`.")
                for t, v in zip(self.terms, vals):
                    self.sums[t.name] += float(v) * n_k
                self.total += float(total) * n_k
                if correct is not None:
                    self.correct += int(round(values[pos]))
                    pos += 1
                self.last_loss = float(total)
            self.seen += n
        self.pending = []
        bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{self.lr:.4f}")

    def row(self, val_top1):
        """The epoch's history row."""
        seen = max(self.seen, 1)
        row = {"epoch": self.epoch + 1, "lr": self.lr, "loss": self.total / seen,
               "losses": {k: v / seen for k, v in self.sums.items()},
               "train_top1": self.correct / seen * 100.0 if self.labelled else None,
               "val_top1": val_top1, "images_per_s": self.seen / max(self.elapsed, 1e-9),
               "epoch_time_s": self.elapsed}
        if self.dropped:
            row["corrupt_skipped"] = self.dropped
        return row
