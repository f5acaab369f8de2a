"""Optimizer and learning-rate schedule names: one registry each, the recipe's only source.

``trainer.optimizer`` and ``trainer.lr_schedule`` are validated against these registries (the
error lists the registered names) and the loop builds from them; adding one is one function and
one decorator line here. No MXNet import: the recipe checks names without loading it.

Recipe example::

    trainer: {optimizer: nesterov, lr: 0.05, lr_schedule: cosine, warmup_epochs: 1}
"""
import logging
import math

from .registry import Registry

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "optimizer_spec", "lr_at"]
_LOGGER = logging.getLogger(__name__)

OPTIMIZERS = Registry("optimizer")
LR_SCHEDULES = Registry("lr schedule")


@OPTIMIZERS.register("sgd")
def _sgd(cfg):
    return "sgd", {"momentum": cfg.momentum}


@OPTIMIZERS.register("nesterov")
def _nesterov(cfg):
    # MXNet's fused nag update is not deterministic with weight decay (distill.nag)
    return "deterministicnag", {"momentum": cfg.momentum}


@OPTIMIZERS.register("adam")
def _adam(cfg):
    return "adam", {}


def optimizer_spec(cfg):
    """``(MXNet optimizer name, its keyword arguments)`` for ``trainer.optimizer``."""
    return OPTIMIZERS.get(cfg.optimizer, where="trainer.optimizer")(cfg)


@LR_SCHEDULES.register("cosine")
def _cosine(cfg, epoch_float):
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    prog = min(max((epoch_float - cfg.warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * prog))


@LR_SCHEDULES.register("step")
def _step(cfg, epoch_float):
    return cfg.lr * cfg.lr_factor ** sum(1 for s in cfg.lr_steps if epoch_float >= s)


@LR_SCHEDULES.register("constant")
def _constant(cfg, epoch_float):
    return cfg.lr


def lr_at(cfg, epoch_float):
    """Learning rate at fractional epoch ``epoch_float`` (warm-up, then the schedule)."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-8) / cfg.warmup_epochs
    return LR_SCHEDULES.get(cfg.lr_schedule, where="trainer.lr_schedule")(cfg, epoch_float)
