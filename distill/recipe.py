"""Recipes: YAML validated into typed objects.

Each YAML section maps 1:1 onto a dataclass whose fields are exactly the keys users write.
Unknown keys raise :class:`~distill.errors.UserError` naming the full key path and the closest
valid key; values are type-checked and range-checked here, at the boundary, so the rest of
the code can trust them.

Recipe example::

    name: quickstart
    extends: base.yaml            # optional: deep-merged under this file
    data: {name: mnist5k, mean: [0.1307], std: [0.3081]}
    teacher: {recipe: teacher_mnist.yaml}
    student: {model: mobilenetv2_0.5}
    distillation:
      - {loss: kd, weight: 0.9, temperature: 4}
      - {loss: ce, weight: 0.1}
    trainer: {epochs: 10, batch_size: 64, lr: 0.05, optimizer: nesterov}
"""
import copy
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import UserError, closest
from .optim import LR_SCHEDULES, OPTIMIZERS
from .pruning import CRITERIA, SCHEDULES            # numpy-only registries
from .quantize import CALIBRATORS, POLICIES         # the package face: registries only, no MXNet

__all__ = ["Recipe", "DataConfig", "TeacherConfig", "StudentConfig", "LossTerm", "PruningConfig",
           "LayerOverride", "PruningTarget",
           "QuantizationConfig", "QATConfig", "PruningRegularize", "PruningGroupSlices", "ExportConfig", "TrainerConfig", "OutputConfig", "load_recipe", "recipe_from_dict",
           "recipe_to_dict", "recipe_hash", "apply_overrides"]
_LOGGER = logging.getLogger(__name__)


# data.augment: crop/hflip (small images, whole batch) and GluonCV's ImageNet training set
AUGMENTATIONS = ("crop", "hflip", "random_resized_crop", "color_jitter", "lighting")
_DEVICE = re.compile(r"(cpu|gpu)\d*")


def _check(cond, key, msg):
    if not cond:
        raise UserError(f"recipe key `{key}`: {msg}")


@dataclass
class DataConfig:
    """``data:`` what to train and evaluate on.

    ``name`` is a registered dataset (``mnist5k``, ``digits``, ``synthetic``, ``image_folder``,
    ``recordio``). ``mean``/``std`` hold one value per channel, applied after pixels are scaled
    to [0, 1].
    """
    name: str = "mnist5k"
    root: Optional[str] = None
    train: Optional[str] = None
    val: Optional[str] = None
    val_split: float = 0.2
    grayscale: Optional[bool] = None
    image_size: Optional[Union[int, List[int]]] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    labels: bool = True
    augment: List[str] = field(default_factory=list)
    min_random_area: float = 0.08
    jitter: float = 0.4
    pca_noise: float = 0.1
    val_resize: Optional[int] = None
    workers: Optional[int] = None
    stream: Optional[bool] = None
    skip_corrupt: bool = True
    limit: Optional[int] = None
    num_samples: int = 2000
    num_classes: int = 10
    channels: int = 1

    def validate(self, p):
        _check(0.0 < self.val_split < 1.0, f"{p}.val_split", f"must be in (0, 1), got {self.val_split}")
        if self.image_size is not None:
            sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size
            _check(len(sizes) in (1, 2) and all(isinstance(s, int) and s >= 4 for s in sizes),
                   f"{p}.image_size", f"must be an integer ≥ 4 or [height, width], got {self.image_size}")
        if self.std is not None:
            _check(all(s > 0 for s in self.std), f"{p}.std", f"every value must be > 0, got {self.std}")
        if self.mean is not None and self.std is not None:
            _check(len(self.mean) == len(self.std), f"{p}.mean",
                   f"has {len(self.mean)} values but `{p}.std` has {len(self.std)}: give one per channel")
        _check(self.limit is None or self.limit >= 1, f"{p}.limit", "must be ≥ 1")
        for a in self.augment:
            _check(a in AUGMENTATIONS, f"{p}.augment",
                   f"unknown augmentation {a!r}; valid: {', '.join(AUGMENTATIONS)}")
        _check(0.0 < self.min_random_area <= 1.0, f"{p}.min_random_area",
               f"must be in (0, 1], got {self.min_random_area}")
        _check(self.jitter >= 0, f"{p}.jitter", f"must be ≥ 0, got {self.jitter}")
        _check(self.pca_noise >= 0, f"{p}.pca_noise", f"must be ≥ 0, got {self.pca_noise}")
        _check(self.val_resize is None or self.val_resize >= 4, f"{p}.val_resize",
               f"must be an integer ≥ 4 (the shorter side before the centre crop), got {self.val_resize}")
        _check(self.workers is None or self.workers >= 0, f"{p}.workers",
               f"must be ≥ 0 (0: decode in the training thread), got {self.workers}")
        _check(self.num_samples >= 2, f"{p}.num_samples", "must be ≥ 2")
        _check(self.num_classes >= 2, f"{p}.num_classes", "must be ≥ 2")
        _check(self.channels in (1, 3), f"{p}.channels", "must be 1 or 3")


@dataclass
class TeacherConfig:
    """``teacher:`` where the frozen teacher comes from.

    Exactly one of ``checkpoint`` (a Module-API or ``export()`` prefix, with ``epoch``),
    ``recipe`` (train it from another recipe unless a trained one is cached) or ``model``
    (a registered model name with ``params``).
    """
    checkpoint: Optional[str] = None
    epoch: int = 0
    recipe: Optional[str] = None
    model: Optional[str] = None
    params: Optional[str] = None
    input_name: str = "data"
    output: Optional[str] = None
    input_shape: Optional[List[int]] = None

    def validate(self, p):
        _check(self.input_shape is None or (len(self.input_shape) == 3 and min(self.input_shape) >= 1),
               f"{p}.input_shape", f"must be [channels, height, width], got {self.input_shape}")
        given = [k for k in ("checkpoint", "recipe", "model") if getattr(self, k)]
        _check(len(given) <= 1, p, f"give only one of `checkpoint`, `recipe`, `model` (got {', '.join(given)})")
        _check(self.epoch >= 0, f"{p}.epoch", "must be ≥ 0")

    @property
    def given(self):
        return bool(self.checkpoint or self.recipe or self.model)


@dataclass
class StudentConfig:
    """``student:`` the network that is trained.

    ``model`` names a registered student (``distill`` lists them; e.g. ``mobilenetv2_0.5``),
    or ``from: teacher`` copies the teacher with its weights. ``max_stride`` caps the total
    downsampling (default: the largest power of two below the input size).
    """
    model: Optional[str] = None
    from_: Optional[str] = None
    max_stride: Optional[int] = None

    def validate(self, p):
        _check(bool(self.model) != bool(self.from_), p,
               "give exactly one of `student.model` (a model name) or `student.from: teacher`")
        _check(self.from_ in (None, "teacher"), f"{p}.from", f"only `teacher` is supported, got {self.from_!r}")
        _check(self.max_stride is None or self.max_stride >= 1, f"{p}.max_stride", "must be ≥ 1")


# what every resolved term carried before each loss declared its own options
_LEGACY_TERM_DEFAULTS = {"temperature": 4.0, "p": 2.0, "distance_weight": 25.0, "angle_weight": 50.0}


@dataclass
class LossTerm:
    """One item of ``distillation:``: a registered loss with its weight and options.

    ``loss`` is a registered loss (``kd``, ``ce``, ``hint``, ``attention``, ``similarity``,
    ``rkd``: ``distill list``). ``teacher_layer``/``student_layer`` name internal outputs
    (``distill inspect`` lists them); unset, a term sees the logits. Every other key is an
    option of the loss (``temperature`` for ``kd``, ``p`` for ``attention``, ...): the loss
    declares them and rejects unknown ones (:meth:`distill.losses.LossTermBlock.validate_term`).
    """
    loss: str = "ce"
    weight: float = 1.0
    teacher_layer: Optional[str] = None
    student_layer: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)

    _EXTRA = "options"        # unknown YAML keys of this section are collected here

    def validate(self, p):
        _check(self.weight >= 0, f"{p}.weight", f"must be ≥ 0, got {self.weight}")
        _check(isinstance(self.loss, str) and bool(self.loss), f"{p}.loss", "must be a loss name")
        # the loss itself knows its options (one file per loss); it imports MXNet, so only here
        from .losses import LOSSES
        cls = LOSSES.get(self.loss, where=f"recipe key `{p}.loss`")
        for k, v in self.options.items():
            if k not in cls.OPTIONS:                      # dropped below or rejected by the loss
                continue
            if isinstance(cls.OPTIONS[k], bool):          # a switch (`standardize: true`)
                _check(isinstance(v, bool), f"{p}.{k}", f"must be true or false, got {v!r}")
                continue
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{p}.{k}",
                   f"loss options are numbers, got {v!r}")
            self.options[k] = float(v)
        # recipes resolved before losses declared their options carry every loss's defaults on
        # every term (run folders' recipe.yaml): those exact values are not the user's words
        for k, v in list(self.options.items()):
            if k not in cls.OPTIONS and _LEGACY_TERM_DEFAULTS.get(k) == v:
                del self.options[k]
        cls.validate_term(self, p)


@dataclass
class LayerOverride:
    """One item of ``pruning.overrides``: a final sparsity for the layers matching a pattern."""
    layers: str = ""
    final_sparsity: float = 0.5

    def validate(self, p):
        _check(bool(self.layers), f"{p}.layers", "give a layer name or glob pattern, e.g. '*stage3*'")
        _check(0.0 <= self.final_sparsity < 1.0, f"{p}.final_sparsity",
               f"must be in [0, 1), got {self.final_sparsity}")


@dataclass
class PruningRegularize:
    """``pruning.regularize:`` sparse training before removal (channel pruning).

    ``kind``: ``group_l2`` (the group lasso of each channel's coupled group: its filters, the
    consumers' input columns and BatchNorm gamma, as Torch-Pruning's ``GroupNormPruner``) or
    ``bn_l1`` (L1 on BatchNorm gamma, network slimming). ``strength`` λ at the first epoch, plus
    ``growth`` per epoch (growing regularisation); active for the first ``epochs`` epochs (default:
    up to the last pruning update). ``targeted``: only the channels the next pruning update would
    remove are pushed down. Weight decay stays as the trainer sets it (the penalty is added to
    the gradients, as those methods do).
    """
    kind: str = "group_l2"
    strength: float = 1e-4
    growth: float = 0.0
    epochs: Optional[int] = None
    targeted: bool = False

    def validate(self, p):
        _check(self.kind in ("group_l2", "bn_l1"), f"{p}.kind", f"must be group_l2 or bn_l1, got {self.kind!r}")
        _check(self.strength > 0, f"{p}.strength", f"must be > 0, got {self.strength}")
        _check(self.growth >= 0, f"{p}.growth", f"must be ≥ 0, got {self.growth}")
        _check(self.epochs is None or self.epochs >= 1, f"{p}.epochs", f"must be ≥ 1, got {self.epochs}")


@dataclass
class PruningGroupSlices:
    """``pruning.group_slices:`` which slices of a channel's coupled group the ``group_l2`` and
    ``group_taylor`` criteria read, besides the producing filters, the consumers' input columns
    and BatchNorm gamma: ``beta`` (BatchNorm's shift, off by default: Torch-Pruning reads gamma
    only) and ``depthwise`` (the depthwise filters of a MobileNet block, off by default:
    Torch-Pruning's ``GroupMagnitudeImportance`` skips them, and the BatchNorm after a depthwise
    conv cancels their scale; measured on the peer bench's MobileNetV2-0.5, 3 seeds: leaving them
    out gained +0.69 top-1 at 75% and +0.23 at 50%, docs/pruning.md).
    """
    beta: bool = False
    depthwise: bool = False


@dataclass
class PruningTarget:
    """``pruning.target:`` prune to a resource target instead of one ratio for every layer: the
    per-group ratios are allocated at the start of the run (``distill sensitivity --target-*``)
    to meet it with the least predicted loss, and the schedule prunes toward them.

    ``latency`` or ``macs``: the fraction of the unpruned model's (e.g. 0.4); ``backend``: where
    latency is measured (``mxnet``: oneDNN-fused, or ``ncnn``: its runtime, one thread, which
    runs one image at a time, so batch 1); ``batch``: 1 or 32 (MXNet's timing batch);
    ``bn_batches``: each candidate's BatchNorm statistics are re-estimated on ``64 × bn_batches``
    training images before it is scored (0: off; a cut shifts the statistics of what follows it,
    and without this most of a candidate's drop is stale BatchNorm that fine-tuning fixes at
    once); ``candidates``: allocations built and measured (resource, KL divergence to the
    unpruned network on training images), the best one on target taken (1: the greedy
    allocation alone). The allocation is written to the run folder (``pruning-target.json``) and
    reused by ``--resume``.
    """
    latency: Optional[float] = None
    macs: Optional[float] = None
    backend: str = "mxnet"
    batch: int = 32
    bn_batches: int = 8
    candidates: int = 12

    def validate(self, p):
        given = [k for k in ("latency", "macs") if getattr(self, k) is not None]
        _check(len(given) == 1, p, f"give exactly one of `latency` or `macs` (a fraction of the unpruned "
               f"model's), got {', '.join(given) or 'neither'}")
        v = getattr(self, given[0])
        _check(0 < v < 1, f"{p}.{given[0]}", f"is a fraction of the unpruned model's, in (0, 1); got {v}")
        _check(self.backend in ("mxnet", "ncnn"), f"{p}.backend", f"must be mxnet or ncnn, got {self.backend!r}")
        _check(self.batch in (1, 32), f"{p}.batch", f"must be 1 or 32, got {self.batch}")
        _check(self.bn_batches >= 0, f"{p}.bn_batches", f"must be ≥ 0 (0: off), got {self.bn_batches}")
        _check(self.candidates >= 1, f"{p}.candidates",
               f"must be ≥ 1 (1: the greedy allocation alone), got {self.candidates}")


@dataclass
class PruningConfig:
    """``pruning:`` prune the student while it trains (see ``distill.pruning``).

    ``granularity``: ``unstructured`` (single weights, masked) or ``channel`` (whole channels,
    physically removed: ``shrink``). ``criterion``: ``group_l2`` (default), ``group_taylor``,
    ``l1``, ``l2``, ``bn_scale``, ``taylor``,
    ``random``. ``schedule``: ``oneshot``, ``iterative``, ``agp``; masks are updated at the start
    of epochs ``start_epoch``, ``start_epoch + frequency``, ... up to ``end_epoch`` (0-based;
    default: the middle of training). ``exclude``: layer names or glob patterns left unpruned;
    ``first`` and ``last`` name the first and the last conv/dense layer. An excluded layer keeps
    its input and output widths (its whole coupled groups); a ``keep_outputs`` layer keeps only its
    output width, its inputs may shrink (Torch-Pruning's ``ignored_layers``).
    """
    enabled: bool = False
    granularity: str = "channel"
    criterion: str = "group_l2"
    scope: str = "layer"
    schedule: str = "agp"
    start_epoch: int = 0
    end_epoch: Optional[int] = None
    frequency: int = 1
    final_sparsity: float = 0.5
    round_to: Union[int, str] = 8
    round_mode: str = "up"
    exclude: List[str] = field(default_factory=lambda: ["first"])
    keep_outputs: List[str] = field(default_factory=lambda: ["last"])
    overrides: List[LayerOverride] = field(default_factory=list)
    target: Optional[PruningTarget] = None
    regularize: Optional[PruningRegularize] = None
    group_slices: Optional[PruningGroupSlices] = None
    shrink: Optional[str] = None            # each_update (channel's default) | end
    optimizer_state: Optional[str] = None   # slice (default) | reset, with shrink: each_update

    def criterion_options(self):
        """Keyword arguments of the criterion's constructor (``group_slices``)."""
        if self.group_slices is None:
            return {}
        return {"beta": self.group_slices.beta, "depthwise": self.group_slices.depthwise}

    def shrink_mode(self):
        """``each_update`` or ``end`` for channel pruning (default ``each_update``), else None."""
        if self.granularity != "channel":
            return None
        return self.shrink or "each_update"

    def validate(self, p):
        _check(self.group_slices is None or self.criterion in ("group_l2", "group_taylor"),
               f"{p}.group_slices", f"chooses the slices of `group_l2` / `group_taylor`; the "
               f"criterion is {self.criterion}")
        _check(self.shrink is None or self.shrink in ("each_update", "end"), f"{p}.shrink",
               f"must be each_update or end, got {self.shrink!r}")
        _check(self.shrink is None or self.granularity == "channel", f"{p}.shrink",
               "only channel pruning makes the network smaller (unstructured sparsity keeps the shapes)")
        _check(self.optimizer_state is None or self.optimizer_state in ("slice", "reset"),
               f"{p}.optimizer_state", f"must be slice or reset, got {self.optimizer_state!r}")
        _check(self.optimizer_state is None or self.shrink_mode() == "each_update",
               f"{p}.optimizer_state", "the optimizer state is sliced or reset when the student is "
               "rebuilt during training: it needs `granularity: channel` with `shrink: each_update`")
        _check(self.regularize is None or self.granularity == "channel", f"{p}.regularize",
               "sparse training pushes whole channels down: it needs `granularity: channel`")
        _check(self.target is None or self.granularity == "channel", f"{p}.target",
               "a latency/MACs target needs `granularity: channel` (unstructured sparsity does not "
               "make a dense engine faster)")
        _check(self.granularity in ("unstructured", "channel"), f"{p}.granularity",
               f"must be unstructured or channel, got {self.granularity!r}")
        _check(self.scope in ("layer", "global"), f"{p}.scope", f"must be layer or global, got {self.scope!r}")
        CRITERIA.get(self.criterion, where=f"recipe key `{p}.criterion`")
        SCHEDULES.get(self.schedule, where=f"recipe key `{p}.schedule`")
        _check(self.start_epoch >= 0, f"{p}.start_epoch", f"must be ≥ 0, got {self.start_epoch}")
        _check(self.end_epoch is None or self.end_epoch >= self.start_epoch, f"{p}.end_epoch",
               f"must be ≥ start_epoch ({self.start_epoch}), got {self.end_epoch}")
        _check(self.frequency >= 1, f"{p}.frequency", f"must be ≥ 1 (epochs), got {self.frequency}")
        _check(0.0 <= self.final_sparsity < 1.0, f"{p}.final_sparsity",
               f"must be in [0, 1), got {self.final_sparsity}")
        _check(self.round_to == "auto" or (isinstance(self.round_to, int) and self.round_to >= 1),
               f"{p}.round_to", f"must be a number ≥ 1 or auto, got {self.round_to!r}")
        _check(self.round_mode in ("up", "down", "nearest"), f"{p}.round_mode",
               f"must be up, down or nearest, got {self.round_mode!r}")

    def check_epochs(self, epochs, p="pruning"):
        """Cross-check with ``trainer.epochs`` (called by :meth:`Recipe.validate`)."""
        if not self.enabled:
            return
        _check(self.start_epoch < epochs, f"{p}.start_epoch",
               f"is {self.start_epoch} but training has only epochs 0..{epochs - 1} (`trainer.epochs: {epochs}`)")
        _check(self.end_epoch is None or self.end_epoch < epochs, f"{p}.end_epoch",
               f"is {self.end_epoch} but training has only epochs 0..{epochs - 1} (`trainer.epochs: {epochs}`)")


@dataclass
class QATConfig:
    """``quantization.qat:`` quantization-aware training after calibration (``distill quantize
    RUN_DIR --qat``): the student is fine-tuned with fake-quantized weights and activations placed
    where MXNet's oneDNN int8 graph quantizes, distilled from the fp32 teacher, and the learned
    ranges become the int8 model's calibration. On when present with ``epochs > 0``.

    ``observer`` is where the ranges start: ``calibration`` (the PTQ thresholds of
    ``quantization.calib_mode``). ``freeze_bn_epoch``: BatchNorm statistics are frozen from this
    epoch on (0-based), and from then on the learning rate is multiplied by ``freeze_bn_lr_mult``
    (default 0.1: without BatchNorm's normalisation of each step, the rate that fine-tunes the live
    graph makes the frozen one diverge: a pruned ResNet-20 fell to 10% top-1 in one epoch at 0.005
    and at 0.001, even without fake quantization; 0.0005 trained). The layers kept fp32 are those ``quantization.exclude`` chose (``none``:
    full int8). Command line: ``--qat``, ``--qat-epochs N``, ``--qat-lr LR``, ``--resume``
    (:mod:`distill.quantize.qat`).
    """
    epochs: int = 0
    lr: float = 0.005
    freeze_bn_epoch: int = 1
    freeze_bn_lr_mult: float = 0.1
    observer: str = "calibration"

    def validate(self, p):
        _check(self.epochs >= 0, f"{p}.epochs", f"must be ≥ 0 (0: no QAT), got {self.epochs}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(self.freeze_bn_epoch >= 0, f"{p}.freeze_bn_epoch", f"must be ≥ 0, got {self.freeze_bn_epoch}")
        _check(0 < self.freeze_bn_lr_mult <= 1, f"{p}.freeze_bn_lr_mult",
               f"must be in (0, 1], got {self.freeze_bn_lr_mult}")
        _check(self.observer in ("calibration",), f"{p}.observer",
               f"must be calibration (the PTQ thresholds), got {self.observer!r}")

    @property
    def enabled(self):
        return self.epochs > 0


@dataclass
class QuantizationConfig:
    """``quantization:`` post-training int8 calibration (``distill quantize RUN_DIR``).

    ``calib_mode`` is ``naive`` (min/max) or ``entropy`` (KL); ``calib_batches`` ×
    ``calib_batch_size`` training images, chosen by ``trainer.seed``, calibrate. ``exclude``
    keeps layers in fp32: ``none``, ``first_last``, ``auto`` (the fewest layers that hold top-1
    within ``budget`` points) or name patterns (``"*conv0*"``, a list or ``a,b``).
    ``granularity`` is how FullyConnected weights are scaled: ``channel-wise`` or ``tensor-wise``
    (MXNet 1.9 scales a calibrated convolution's weights per output channel either way).
    ``enabled: true`` runs this step at the end of ``distill train`` (same as
    ``distill quantize RUN_DIR`` afterwards). ``layer_latency`` times every weight layer alone
    in fused fp32 and in int8 and names those int8 makes slower (a few seconds per model).
    """
    enabled: bool = False
    calib_mode: str = "naive"
    calib_batches: int = 10
    calib_batch_size: int = 32
    exclude: Union[str, List[str]] = "auto"
    budget: float = 0.5
    granularity: str = "channel-wise"
    layer_latency: bool = True
    qat: QATConfig = field(default_factory=QATConfig)

    def validate(self, p):
        CALIBRATORS.get(self.calib_mode, where=f"recipe key `{p}.calib_mode`")
        _check(self.calib_batches >= 1, f"{p}.calib_batches", f"must be ≥ 1, got {self.calib_batches}")
        _check(self.calib_batch_size >= 1, f"{p}.calib_batch_size",
               f"must be ≥ 1, got {self.calib_batch_size}")
        patterns = self.exclude if isinstance(self.exclude, list) else self.exclude.split(",")
        _check(bool(patterns) and all(s.strip() for s in patterns), f"{p}.exclude",
               "must be none, first_last, auto, or layer-name patterns (e.g. \"*conv0*,*dense*\"); "
               f"got {self.exclude!r}")
        words = [s.strip() for s in patterns]
        if len(words) == 1 and words[0] not in POLICIES and not set("*?[") & set(words[0]):
            near = closest(words[0], POLICIES.names())
            _check(not near, f"{p}.exclude",
                   f"{words[0]!r} is not a policy (did you mean {near[0]!r}?); policies: "
                   f"{', '.join(POLICIES.names())}, or layer-name patterns such as \"*conv0*\"")
        _check(self.budget >= 0, f"{p}.budget", f"must be ≥ 0 (points of top-1), got {self.budget}")
        _check(self.granularity in ("channel-wise", "tensor-wise"), f"{p}.granularity",
               f"must be channel-wise or tensor-wise; got {self.granularity!r}")


# the registered export formats (distill.export.formats.FORMATS, filled when the MXNet-importing
# format modules load; a test keeps this list equal to it)
EXPORT_FORMATS = ("mxnet", "onnx", "onnx-int8", "ncnn", "ncnn-int8")


@dataclass
class ExportConfig:
    """``export:`` deploy the student at the end of ``distill train`` (the same as
    ``distill export RUN_DIR --format ...`` afterwards), each format checked in its runtime.

    ``formats``: ``mxnet``, ``onnx``, ``onnx-int8``, ``ncnn``, ``ncnn-int8``, or ``all`` (every
    format whose runtime is installed). A section that sets any key exports unless
    ``enabled: false``. A failed check is reported and kept in ``metrics.json`` (``export``);
    the run itself still completes.
    """
    enabled: bool = False
    formats: List[str] = field(default_factory=lambda: ["all"])

    def validate(self, p):
        _check(bool(self.formats), f"{p}.formats", "give at least one format, or `all`")
        for f in self.formats:
            if f != "all" and f not in EXPORT_FORMATS:
                near = closest(f, list(EXPORT_FORMATS))
                _check(False, f"{p}.formats", f"unknown format {f!r}{' (did you mean ' + repr(near[0]) + '?)' if near else ''}; "
                       f"formats: {', '.join(EXPORT_FORMATS)}, or all")


@dataclass
class TrainerConfig:
    """``trainer:`` the optimisation loop.

    ``kvstore`` is the Gluon Trainer's KVStore: ``local`` (default), ``device``, or
    ``dist_sync``/``dist_async`` for MXNet parameter-server training (``distill launch``).
    """
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "nesterov"
    momentum: float = 0.9
    weight_decay: float = 4e-5
    lr_schedule: str = "cosine"
    lr_steps: List[int] = field(default_factory=list)
    lr_factor: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    eval_batch_size: int = 256
    progress: bool = True
    teacher_cache: str = "auto"
    teacher_cache_max_mb: float = 2048.0
    teacher_cache_shared: bool = True
    kvstore: str = "local"
    devices: List[str] = field(default_factory=lambda: ["cpu"])
    checkpoint_every: Optional[int] = None

    def validate(self, p):
        _check(isinstance(self.devices, list) and len(self.devices) >= 1
               and all(isinstance(d, str) and _DEVICE.fullmatch(d) for d in self.devices),
               f"{p}.devices", f"must be a list like [cpu], [gpu0, gpu1] or [cpu0, cpu1]; got {self.devices!r}")
        _check(len(set(self.devices)) == len(self.devices), f"{p}.devices",
               f"names a device twice: {self.devices}")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1, f"{p}.checkpoint_every",
               f"must be a number of steps ≥ 1, got {self.checkpoint_every}")
        _check(self.kvstore in ("local", "device", "dist_sync", "dist_async"), f"{p}.kvstore",
               f"must be one of local, device, dist_sync, dist_async; got {self.kvstore!r}")
        _check(self.teacher_cache in ("auto", "memory", "disk", "off"), f"{p}.teacher_cache",
               f"must be one of auto, memory, disk, off; got {self.teacher_cache!r}")
        _check(self.teacher_cache_max_mb > 0, f"{p}.teacher_cache_max_mb", "must be > 0")
        _check(isinstance(self.teacher_cache_shared, bool), f"{p}.teacher_cache_shared",
               f"must be true or false, got {self.teacher_cache_shared!r}")
        _check(self.epochs >= 1, f"{p}.epochs", f"must be ≥ 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be ≥ 1, got {self.batch_size}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        OPTIMIZERS.get(self.optimizer, where=f"recipe key `{p}.optimizer`")
        _check(0 <= self.momentum < 1, f"{p}.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        LR_SCHEDULES.get(self.lr_schedule, where=f"recipe key `{p}.lr_schedule`")
        _check(0 < self.lr_factor <= 1, f"{p}.lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        _check(0 <= self.warmup_epochs < self.epochs, f"{p}.warmup_epochs",
               f"must be in [0, epochs), got {self.warmup_epochs}")
        _check(self.eval_batch_size >= 1, f"{p}.eval_batch_size", "must be ≥ 1")


@dataclass
class OutputConfig:
    """``output:`` where the run folder goes (default ``runs/<name>``)."""
    dir: Optional[str] = None
    latency: bool = True
    latency_repeats: int = 20

    def validate(self, p):
        _check(self.latency_repeats >= 1, f"{p}.latency_repeats", "must be ≥ 1")


@dataclass
class Recipe:
    """A whole recipe. ``source`` (the file it came from) is not a YAML key."""
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(model="cifar_resnet20_v1"))
    distillation: List[LossTerm] = field(default_factory=lambda: [LossTerm(loss="ce")])
    pruning: PruningConfig = field(default_factory=PruningConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self, p=""):
        _check(isinstance(self.name, str) and self.name and "/" not in self.name, "name",
               f"must be a non-empty name without '/', got {self.name!r}")
        _check(len(self.distillation) >= 1, "distillation", "needs at least one loss term")
        uses_teacher = any(t.loss != "ce" for t in self.distillation) or self.student.from_
        _check(self.teacher.given or not uses_teacher, "teacher",
               "the recipe uses the teacher (a `kd` term or `student.from: teacher`) but names none: "
               "set `teacher.recipe`, `teacher.checkpoint` or `teacher.model`")
        if not self.data.labels:
            from .losses import LOSSES
            for i, t in enumerate(self.distillation):
                cls = LOSSES.get(t.loss)
                _check(not cls.needs_labels, f"distillation[{i}]", cls.without_labels(t.loss))
        self.pruning.check_epochs(self.trainer.epochs)

    @property
    def run_dir(self):
        return self.output.dir or os.path.join("runs", self.name)


# -- loading -------------------------------------------------------------------------------------

_ALIASES = {"from": "from_"}          # YAML key -> field name (``from`` is a Python keyword)
_TOP_ONLY = ("extends",)


def _yaml_key(fname):
    return {v: k for k, v in _ALIASES.items()}.get(fname, fname)


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, path):
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:              # Optional[X]: X's own message (a section names its key)
            return _coerce(value, real[0], path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except UserError as e:
                errors.append(e)
        raise UserError(f"recipe key `{path}`: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"recipe key `{path}`: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"recipe key `{path}`: expected {_type_name(tp)}, got {value!r}")


def _build(cls, raw, path):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe key `{path}`: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = [_yaml_key(n) for n in fields]
    kwargs = {}
    extra_field = getattr(cls, "_EXTRA", None)
    for key, value in raw.items():
        fname = _ALIASES.get(key, key)
        full = f"{path}.{key}" if path else str(key)
        if extra_field and isinstance(key, str) and (fname not in fields or fname == extra_field):
            if fname == extra_field:
                raise UserError(f"recipe key `{full}`: write the loss's options as keys of the term "
                                f"itself, e.g. {{loss: kd, temperature: 4}}")
            if value is not None:
                kwargs.setdefault(extra_field, {})[key] = value
            continue
        if not isinstance(key, str) or fname not in fields:
            near = closest(key, valid)
            hint = f" Did you mean `{near[0]}`?" if near else ""
            raise UserError(f"unknown recipe key `{full}`.{hint} Valid keys"
                            f"{' in `' + path + '`' if path else ''}: {', '.join(valid)}.")
        if value is None:      # a None never overrides a default (timm's create_model habit)
            continue
        kwargs[fname] = _coerce(value, hints[fname], full)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


# what a recipe that names a teacher but no `distillation` trains with (the README's reference)
DEFAULT_DISTILLATION = [{"loss": "kd", "weight": 0.7, "temperature": 4.0}, {"loss": "ce", "weight": 0.3}]


def _names_teacher(teacher):
    return isinstance(teacher, dict) and any(teacher.get(k) for k in ("checkpoint", "recipe", "model"))


def recipe_from_dict(raw, source="<recipe>"):
    """Validate a plain dict (``extends`` already resolved) into a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    raw.pop("extends", None)
    if "distillation" in raw and isinstance(raw["distillation"], dict):
        raw["distillation"] = [raw["distillation"]]
    for section in ("pruning", "export"):
        sec = raw.get(section)
        if isinstance(sec, dict) and sec and "enabled" not in sec:
            # a section that sets any key means the step is wanted; only `enabled: false` stops it
            raw[section] = {**sec, "enabled": True}
            _LOGGER.info("%s: `%s` sets %s without `enabled`: it is on (write `enabled: false` to "
                         "keep the section and skip the step)", source, section, ", ".join(map(str, sec)))
    if raw.get("distillation") is None and _names_teacher(raw.get("teacher")):
        raw["distillation"] = copy.deepcopy(DEFAULT_DISTILLATION)
        _LOGGER.info("%s: no `distillation` section: KD (weight 0.7, T 4) + CE (0.3) against the "
                     "teacher", source)
    try:
        return _build(Recipe, raw, "")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def recipe_to_dict(recipe):
    """The recipe as plain data, with YAML key names (``from``, not ``from_``), no ``None``s."""
    def conv(obj):
        if dataclasses.is_dataclass(obj):
            extra = getattr(obj, "_EXTRA", None)
            out = {_yaml_key(f.name): conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if getattr(obj, f.name) is not None and f.name != extra}
            if extra:
                out.update(copy.deepcopy(getattr(obj, extra)))
            return out
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        return obj
    return conv(recipe)


def recipe_hash(recipe, sections=None):
    """A short, stable hash of the recipe (or of some sections of it)."""
    d = recipe_to_dict(recipe)
    d.pop("output", None)                      # where results go and how they are shown,
    d.pop("quantization", None)                # and post-training int8 calibration
    d.pop("export", None)                      # and export,
    d.get("trainer", {}).pop("progress", None)  # do not change what is trained
    if d.get("trainer", {}).get("kvstore") == "local":
        d["trainer"].pop("kvstore")            # the default: runs made before the key stay fresh
    for key in ("devices", "checkpoint_every"):  # where and how often to save: the same training
        d.get("trainer", {}).pop(key, None)
    data = d.get("data", {})
    for key in ("workers",):                   # how many threads decode, not what
        data.pop(key, None)
    for key, default in (("min_random_area", 0.08), ("jitter", 0.4), ("pca_noise", 0.1)):
        if data.get(key) == default:           # defaults: runs made before the keys stay fresh
            data.pop(key)
    if not d.get("pruning", {}).get("enabled"):
        d.pop("pruning", None)                 # new pruning keys must not make old runs stale
    else:
        for key, default in (("round_mode", "up"), ("keep_outputs", [])):
            if d["pruning"].get(key) == default:  # defaults: runs made before the keys stay fresh
                d["pruning"].pop(key)
    if sections:
        d = {k: d[k] for k in sections}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _read_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"recipe file {path!r} does not exist (looked in {os.path.abspath(path)}).")
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}. Check indentation and that "
                        f"every `key: value` pair has a space after the colon.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections (name, data, teacher, "
                        f"student, distillation, trainer, ...), got {type(data).__name__}")
    return data


def _merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_raw(path, seen=()):
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"{path}: `extends` forms a cycle: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    parent = data.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise UserError(f"{path}: `extends` must be the path of another recipe, got {parent!r}")
        ppath = os.path.join(os.path.dirname(path), parent)
        if not os.path.isfile(ppath):
            raise UserError(f"{path}: `extends: {parent}` names a file that does not exist ({ppath}).")
        base = _rebase_paths(_load_raw(ppath, seen + (path,)), os.path.dirname(os.path.abspath(ppath)),
                             os.path.dirname(path))
        data = _merge(base, {k: v for k, v in data.items() if k != "extends"})
    return data


# recipe keys that hold a file or folder path, resolved against the recipe that wrote them
PATH_KEYS = (("teacher", "recipe"), ("teacher", "checkpoint"), ("teacher", "params"),
             ("data", "root"), ("data", "train"), ("data", "val"))


def _rebase_paths(raw, from_dir, to_dir):
    """Paths written in a base recipe (in ``from_dir``) rewritten relative to ``to_dir``, the
    folder of the recipe that extends it, so each path means what it meant where it was written.

    A relative path is rebased only when it exists next to the base (as a file, folder or
    checkpoint prefix): paths relative to the working directory stay as written, which is how
    :func:`distill.teacher.resolve_path` reads them too."""
    if os.path.abspath(from_dir) == os.path.abspath(to_dir):
        return raw
    raw = copy.deepcopy(raw)
    for section, key in PATH_KEYS:
        sec = raw.get(section)
        value = sec.get(key) if isinstance(sec, dict) else None
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        cand = os.path.join(from_dir, value)
        if os.path.exists(cand) or glob.glob(glob.escape(cand) + "-*"):
            rel = os.path.relpath(cand, to_dir or ".")
            sec[key] = os.path.abspath(cand) if rel.startswith(os.pardir) else rel
    return raw


def apply_overrides(raw, overrides):
    """Apply ``--set a.b=value`` overrides (value parsed as YAML) to a raw recipe dict."""
    raw = copy.deepcopy(raw)
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.epochs=3")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: `{'.'.join(parts[:i])}` is not a section")
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {item}: `{'.'.join(parts[:-1])}` is not a section")
    return raw


def load_recipe(path, overrides=()):
    """Read a recipe file (resolving ``extends``), apply ``--set`` overrides, validate."""
    raw = apply_overrides(_load_raw(path), overrides)
    source = path + (f" (with --set {' '.join(overrides)})" if overrides else "")
    recipe = recipe_from_dict(raw, source)
    recipe.source = os.path.abspath(path)
    return recipe
