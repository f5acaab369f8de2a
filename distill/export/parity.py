"""Agreement between a runtime's logits and MXNet's: functions over arrays, no I/O.

An export counts only when its runtime ran it on the test split and agreed with MXNet:
fp32 formats on every logit, ``max |Δ| ≤ atol + rtol · max |ref|`` (relative to the logits'
scale: float32 rounding grows with it, so untrained-scale logits in the hundreds differ by 1e-3
while agreeing on every image; ``atol`` is the floor for logits near 0), reduced-precision
formats (ncnn ``--fp16``, onnxruntime int8) by top-1.
"""
import numpy as np

from ..errors import UserError

__all__ = ["ExportMismatch", "compare_logits", "allowed_diff", "check_close", "close_rule",
           "check_agreement", "check_top1_drop"]


class ExportMismatch(UserError):
    """A runtime disagreed with MXNet beyond the tolerance: the export does not count."""


def _top1(logits, labels):
    if labels is None or len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1) == labels).mean() * 100.0)


def compare_logits(ref, out, labels=None):
    """Compare a runtime's logits with MXNet's on the same images.

    Parameters
    ----------
    ref : np.ndarray
        MXNet logits, ``(N, K)``.
    out : np.ndarray
        The runtime's logits for the same images, ``(N, K)``.
    labels : np.ndarray or None
        ``(N,)`` int labels of the test split, for top-1 accuracy.

    Returns
    -------
    dict
        ``max_abs_diff``, ``mean_abs_diff``, ``ref_max_abs`` (max |ref|, the logits' scale),
        ``rel_max_diff`` (max |Δ| / max |ref|), ``top1_agreement`` (% of images with the same
        arg-max), ``top1`` and ``top1_mxnet`` (% correct; NaN without labels), ``images``.
    """
    ref = np.asarray(ref, np.float32)
    out = np.asarray(out, np.float32).reshape(ref.shape)
    diff = np.abs(ref.astype(np.float64) - out)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_diff = float(diff.max()) if diff.size else 0.0
    return {"images": int(ref.shape[0]),
            "max_abs_diff": max_diff,
            "ref_max_abs": scale,
            "rel_max_diff": max_diff / scale if scale > 0 else (0.0 if max_diff == 0 else float("inf")),
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean() * 100.0),
            "top1": _top1(out, labels), "top1_mxnet": _top1(ref, labels)}


def allowed_diff(stats, atol, rtol):
    """The largest max |Δ| allowed: ``atol + rtol · max |ref|``."""
    return atol + rtol * stats.get("ref_max_abs", 0.0)


def close_rule(atol, rtol):
    """The rule in words, for a check's ``rule``."""
    return f"max |Δlogit| ≤ {atol:g} + {rtol:g} × max |MXNet logit|"


def check_close(stats, atol, rtol):
    """``None`` when ``max |Δ| ≤ atol + rtol · max |ref|``, else the reason (one sentence).

    Parameters
    ----------
    stats : dict
        From :func:`compare_logits`.
    atol, rtol : float
        Absolute floor and tolerance relative to the largest MXNet logit.
    """
    limit = allowed_diff(stats, atol, rtol)
    if not np.isfinite(stats["max_abs_diff"]) or stats["max_abs_diff"] > limit:
        return (f"max abs logit difference from MXNet {stats['max_abs_diff']:.3g} > {limit:.3g} "
                f"(= {atol:g} + {rtol:g} × max |logit| {stats.get('ref_max_abs', 0.0):.3g}; relative "
                f"{stats.get('rel_max_diff', float('nan')):.2g}) on {stats['images']} test images, "
                f"top-1 agreement {stats['top1_agreement']:.2f}%")
    return None


def check_agreement(stats, min_agreement):
    """``None`` when at least ``min_agreement`` % of images keep MXNet's top-1 class."""
    if stats["top1_agreement"] < min_agreement:
        return (f"top-1 agreement with MXNet {stats['top1_agreement']:.2f}% < {min_agreement:g}% "
                f"on {stats['images']} test images (max abs logit difference "
                f"{stats['max_abs_diff']:.3g})")
    return None


def check_top1_drop(stats, max_drop):
    """``None`` when top-1 accuracy is at most ``max_drop`` points below MXNet's fp32 top-1."""
    drop = stats["top1_mxnet"] - stats["top1"]
    if np.isnan(drop):              # no labels: fall back to agreement with the fp32 model
        drop = 100.0 - stats["top1_agreement"]
    if drop > max_drop + 1e-9:
        return (f"top-1 {stats['top1']:.2f}% is {drop:.2f} points below fp32 MXNet "
                f"({stats['top1_mxnet']:.2f}%), more than the allowed {max_drop:g}")
    return None
