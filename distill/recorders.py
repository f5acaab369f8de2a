"""Modifiers that record a finished epoch: tensorboard scalars, the checkpoint, the log line.

They sit at the end of the modifier list (:func:`default_recorders`), so they see the complete
history row, the other modifiers' entries and scalars included. The loop itself writes nothing.

Recipe example (nothing to write: every run records; ``output.dir`` says where)::

    output: {dir: runs/my_run}
"""
import logging

from .checkpoint import save_checkpoint
from .modifier import Modifier

__all__ = ["TensorboardLogger", "Checkpointer", "EpochLog", "default_recorders"]
_LOGGER = logging.getLogger(__name__)


class TensorboardLogger(Modifier):
    """tensorboardX scalars per epoch: ``loss/<term>``, ``loss/total``, ``lr``, ``top1/train``,
    ``top1/val``, ``speed/images_per_s``, plus every modifier's :meth:`~Modifier.scalars`."""

    name = "tensorboard"

    def __init__(self, writer):
        self.writer = writer

    def record(self, epoch, row, loop):
        step = epoch + 1
        for tag, v in loop.scalars(epoch).items():
            self.writer.add_scalar(tag, v, step)
        for k, v in row["losses"].items():
            self.writer.add_scalar(f"loss/{k}", v, step)
        self.writer.add_scalar("loss/total", row["loss"], step)
        self.writer.add_scalar("lr", row["lr"], step)
        if loop.labelled:
            self.writer.add_scalar("top1/train", row["train_top1"], step)
        self.writer.add_scalar("top1/val", row["val_top1"], step)
        self.writer.add_scalar("speed/images_per_s", row["images_per_s"], step)
        self.writer.flush()


class Checkpointer(Modifier):
    """An atomic checkpoint after every epoch (and every ``trainer.checkpoint_every`` steps):
    parameters, optimizer state, every modifier's state, the history and the resolved recipe
    (:mod:`distill.checkpoint`)."""

    name = "checkpoint"

    def __init__(self, folder, recipe_dict=None):
        self.folder, self.recipe_dict = folder, recipe_dict

    def record(self, epoch, row, loop):
        save_checkpoint(self.folder, epoch, loop.owner, loop.trainer,
                        {"history": loop.history, "recipe": self.recipe_dict,
                         "modifiers": {m.name: m.state_dict() for m in loop.modifiers},
                         "train_time_s": loop.train_time_s()})

    def mid_epoch(self, epoch, steps_done, partial, loop):
        """``trainer.checkpoint_every``: the same checkpoint after ``steps_done`` steps of
        ``epoch`` (``epoch-NNNN-step-SSSSSS.ckpt``), with the epoch's running sums."""
        save_checkpoint(self.folder, epoch - 1, loop.owner, loop.trainer,
                        {"history": loop.history, "recipe": self.recipe_dict,
                         "modifiers": {m.name: m.state_dict() for m in loop.modifiers},
                         "train_time_s": loop.train_time_s(), "partial": partial},
                        step=(epoch, steps_done))


class EpochLog(Modifier):
    """One line per epoch: losses, train/val top-1, throughput."""

    name = "log"

    def __init__(self, log=print):
        self.log = log

    def record(self, epoch, row, loop):
        train_txt = f"train {row['train_top1']:.2f}%  " if loop.labelled else ""
        val = row["val_top1"]
        val_txt = f"val {val:.2f}%  " if val == val else ""      # NaN: not evaluated on this rank
        self.log(f"epoch {epoch + 1}/{loop.cfg.epochs}  loss {row['loss']:.4f}  "
                 + "  ".join(f"{k} {v:.4f}" for k, v in row["losses"].items())
                 + f"  {train_txt}{val_txt}{row['images_per_s']:.0f} img/s"
                 + (f"  ({row['corrupt_skipped']} corrupt image(s) skipped, data.skip_corrupt)"
                    if row.get("corrupt_skipped") else ""))


def default_recorders(writer, checkpoints, recipe_dict, log=print, root=True):
    """Tensorboard, checkpoint and log line, in the order the loop wrote them before.

    ``root=False`` (a ``dist_*`` worker other than rank 0): only the log line; rank 0 alone
    writes tensorboard and checkpoints (the workers' states are the same, see
    :mod:`distill.distributed`)."""
    if not root:
        return [EpochLog(log)]
    return [TensorboardLogger(writer), Checkpointer(checkpoints, recipe_dict), EpochLog(log)]
