"""Quantization-aware training: the student fine-tuned as MXNet's int8 graph will run it,
distilled from its fp32 teacher, and exported as exactly that int8 graph.

* :mod:`.fakequant`: where MXNet's oneDNN int8 graph quantizes (read from the graph itself) and
  the fake-quantized fp32 graph that rounds there (LSQ steps, BN folded, per-channel weights);
* :mod:`.train`: the fine-tuning (the project's loop, checkpoints, ``--resume``) and the int8
  graph built from the learned ranges.

Recipe example::

    quantization:
      calib_mode: entropy        # where the ranges start (the PTQ calibration)
      exclude: none              # full int8
      qat: {epochs: 3, lr: 0.005, freeze_bn_epoch: 1}
"""
from .fakequant import QuantPlan, QuantPoint, WeightQuant, fake_quant_symbol, quant_plan
from .train import QAT_DIR, QATNet, QATResult, build_qat_net, run_qat

__all__ = ["QuantPlan", "QuantPoint", "WeightQuant", "fake_quant_symbol", "quant_plan", "QAT_DIR",
           "QATNet", "QATResult", "build_qat_net", "run_qat"]
