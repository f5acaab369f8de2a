"""The modifier lifecycle: units that act on the training loop without living in it.

SparseML's lifecycle, trimmed. The loop (:func:`distill.trainer.fit`) calls every hook of every
modifier in list order; each hook is optional::

    initialize(net, trainer, data)             once, before the first epoch (and after resume)
    epoch_start(epoch)                         0-based epoch
    after_step(epoch, step, steps_per_epoch)   right after optimizer.step(): e.g. re-apply masks
    epoch_end(epoch) -> dict                   entries to add to the epoch's history row
    scalars(epoch) -> dict                     tensorboard tag -> value for this epoch
    record(epoch, row, loop)                   the finished row: log, tensorboard, checkpoint
    take_rebuild() -> Rebuild or None          after epoch_start: a smaller student to go on with
    rebind(net, trainer)                       the loop swapped in that student (and a new trainer)
    finalize(net, data, log) -> net            after training: may replace the trained network
    metrics(net) -> dict                       entries for ``metrics.json``'s ``student`` section
    state_dict() / load_state_dict(d)          saved in every checkpoint, restored on --resume

Pruning schedules, mask keeping, tensorboard, checkpoints and the console log are modifiers
(:mod:`distill.pruning.modifier`, :mod:`distill.recorders`).

On several devices every parameter has one replica per context and ``param.data()`` is only the
current context's: a modifier reads weights through :func:`distill.replicas.first`, writes them
through :func:`~distill.replicas.set_all` / :func:`~distill.replicas.apply_mask`, and takes
gradients from :func:`~distill.replicas.grad_after_step`, so the replicas stay identical.
"""
import logging

__all__ = ["Modifier", "LoopState"]
_LOGGER = logging.getLogger(__name__)


class LoopState:
    """What :meth:`Modifier.record` may read: the loop's objects and its history so far.

    Attributes
    ----------
    owner : gluon.Block
        Everything the optimizer updates (student + loss-term parameters).
    trainer : gluon.Trainer
    modifiers : list of Modifier
    history : list of dict
        One row per finished epoch.
    cfg : TrainerConfig
    labelled : bool
    """

    def __init__(self, owner, trainer, modifiers, history, cfg, labelled, train_time):
        self.owner, self.trainer, self.modifiers = owner, trainer, modifiers
        self.history, self.cfg, self.labelled = history, cfg, labelled
        self._train_time = train_time

    def train_time_s(self):
        """Training time so far in seconds, resumed runs included."""
        return self._train_time()

    def scalars(self, epoch):
        """Every modifier's tensorboard scalars for ``epoch``."""
        out = {}
        for m in self.modifiers:
            out.update(m.scalars(epoch) or {})
        return out


class Modifier:
    """Base of every modifier: all hooks do nothing (see the module docstring)."""

    name = "modifier"

    def initialize(self, net, trainer, data):
        pass

    def epoch_start(self, epoch):
        pass

    def after_step(self, epoch, step, steps_per_epoch):
        pass

    def before_step(self, epoch, step):
        """After the backward pass, before the optimizer step (a penalty added to the
        gradients: ``pruning.regularize``)."""

    def mid_epoch(self, epoch, steps_done, partial, loop):
        """Every ``trainer.checkpoint_every`` steps inside an epoch (the checkpoint recorder
        saves there); ``partial``: the epoch's running sums, to be restored on resume."""

    def take_rebuild(self):
        """A :class:`~distill.pruning.channel.Rebuild` to continue training with (channel
        pruning with ``shrink: each_update``), handed over once; None: keep the network."""
        return None

    def rebind(self, net, trainer):
        """The loop continues on ``net`` (a rebuilt student) with a new ``trainer``."""

    def epoch_end(self, epoch):
        return {}

    def scalars(self, epoch):
        return {}

    def record(self, epoch, row, loop):
        pass

    def finalize(self, net, data, log):
        return net

    def metrics(self, net):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
