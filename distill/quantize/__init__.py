"""Post-training int8 calibration on MXNet's oneDNN path, and which layers must stay fp32.

* :mod:`.graph`: the fp32 model, its weight layers, int8 graphs built from it;
* :mod:`.calibrators`: ``naive`` and ``entropy`` thresholds (registered by name);
* :mod:`.policies`: ``none``, ``first_last``, ``auto`` and name patterns (registered by name);
* :mod:`.scoring`: top-1 and output shift of int8 variants, per-layer sensitivity;
* :mod:`.pipeline`: a run folder end to end (``distill quantize RUN_DIR``).

Recipe example::

    quantization:
      calib_mode: naive          # naive | entropy
      calib_batches: 10
      calib_batch_size: 32
      exclude: auto              # none | first_last | auto | ["*conv0_fwd", "*dense*"]
      budget: 0.5                # points of top-1 `auto` may lose
      granularity: channel-wise

This package's face holds only the name registries (no MXNet import), so the recipe checks
``calib_mode`` and ``exclude`` against them at load time; the work is in the submodules.
"""
from .calibrators import CALIBRATORS, calibration_indices
from .policies import POLICIES, Selection, resolve_policy

__all__ = ["CALIBRATORS", "POLICIES", "Selection", "calibration_indices", "resolve_policy"]
