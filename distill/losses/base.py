"""The loss registry and the interface every loss term follows.

A loss term is a Gluon ``HybridBlock`` called as ``term(student, label, teacher)`` that
returns one loss per sample, shape ``(N,)``. ``student``/``teacher`` are logits ``(N, K)``;
``label`` is ``(N,)``. Which tensors a term sees is decided by the recipe, never by the loop.

Each loss declares its own recipe options (:attr:`LossTermBlock.OPTIONS`, name → default) and
checks their values (:meth:`LossTermBlock.check`); a recipe's ``distillation`` item carries
``loss``, ``weight``, ``teacher_layer``, ``student_layer`` and passes every other key to the
loss, which rejects the ones it does not take. Adding a loss touches one file.

A term whose value follows the training schedule (``dkd``'s warm-up) reads the epoch from
:meth:`LossTermBlock.set_epoch`, which the loop calls on every term at each epoch start.
"""
from mxnet import gluon

from ..errors import UserError, closest
from ..registry import Registry

__all__ = ["LOSSES", "LossTermBlock"]

LOSSES = Registry("loss")


class LossTermBlock(gluon.HybridBlock):
    """Base class: declares what a term needs, so the loop can skip the teacher or labels.

    Attributes
    ----------
    OPTIONS : dict
        Recipe options this loss takes (name → default); passed to the constructor.
    needs_teacher, needs_labels : bool
        Whether the term reads the teacher's outputs / the labels. A recipe with
        ``data.labels: false`` and a term that needs labels is rejected with
        :meth:`without_labels`.
    layers : str
        ``"logits"`` (no ``teacher_layer``/``student_layer`` allowed), ``"both"`` (both
        required) or ``"any"``.
    """

    OPTIONS = {}
    hybridizable = True        # False: the forward uses shapes a cached graph cannot take
    needs_teacher = False
    needs_labels = False
    layers = "any"

    @classmethod
    def check(cls, options):
        """Value checks of the options (known names, defaults filled in): ``None``, or
        ``(option, what is wrong)``."""
        return None

    @classmethod
    def without_labels(cls, name):
        """Why a ``name`` term cannot run on data without labels, and what to do instead."""
        return (f"a `{name}` term needs labels but the data have none (`data.labels: false`): "
                f"drop the `{name}` term or set `data.labels: true`.")

    def set_epoch(self, epoch):
        """Called by the loop at the start of every epoch (0-based); most terms ignore it."""

    def keep_student_channels(self, keep):
        """The student's tapped layer lost channels (channel pruning rebuilt it smaller):
        ``keep`` (1-D bool) says which of its current channels stay. A term whose own
        parameters read those channels cuts them here and returns ``{structural name within
        this block: [(axis, keep)]}`` so the optimizer state follows; the default does nothing
        (a term that does not depend on the student's channel count)."""
        return {}

    @classmethod
    def validate_term(cls, term, where):
        """:class:`UserError` for an option this loss does not take, a bad value, or layers it
        cannot use. ``term`` is a recipe :class:`~distill.recipe.LossTerm`."""
        unknown = sorted(set(term.options) - set(cls.OPTIONS))
        if unknown:
            valid = ["loss", "weight", "teacher_layer", "student_layer"] + sorted(cls.OPTIONS)
            near = closest(unknown[0], valid)
            hint = f" Did you mean `{near[0]}`?" if near else ""
            raise UserError(f"recipe key `{where}.{unknown[0]}`: loss `{term.loss}` takes no option "
                            f"{unknown[0]!r}.{hint} Valid keys for `{term.loss}`: {', '.join(valid)}.")
        opts = {**cls.OPTIONS, **term.options}
        bad = cls.check(opts)
        if bad:
            raise UserError(f"recipe key `{where}.{bad[0]}`: {bad[1]}")
        if cls.layers == "logits" and (term.teacher_layer or term.student_layer):
            raise UserError(f"recipe key `{where}`: a `{term.loss}` term uses the logits and labels: "
                            f"remove `teacher_layer`/`student_layer`")
        if cls.layers == "both" and not (term.teacher_layer and term.student_layer):
            raise UserError(f"recipe key `{where}`: a `{term.loss}` term needs both `teacher_layer` "
                            f"and `student_layer` (feature maps)")
        return opts
