"""Paired statistics of a comparison: is A − B a difference, or noise?

Two tests, both paired (STYLE.md pattern 15: the same seeds and the same test images for
every variant):

* over seeds: the runs of A and B with the same ``trainer.seed`` form a pair; the mean of the
  per-seed differences in top-1 (points) ± their sample std, and Student's paired t-test
  (two-sided, ``n − 1`` degrees of freedom; Student, 1908) on them. It asks whether the
  difference survives a retraining; with one seed it cannot be computed.
* over images: McNemar's exact test (McNemar, 1947) on the per-image predictions of every
  seed pooled: ``b`` images A gets right and B wrong, ``c`` the other way round, and the exact
  two-sided binomial p of ``b`` out of ``b + c`` at one half. It asks whether the trained
  models differ on these images, not whether another training would.

A verdict says what the tests support at :data:`ALPHA`. Everything here is a pure function of
arrays and numbers; reading predictions from run folders is :mod:`distill.compare.predictions`.
"""
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np

__all__ = ["ALPHA", "PairResult", "paired_t_test", "mcnemar_counts", "mcnemar_exact_p",
           "regularized_beta", "verdict", "pair_result", "format_p", "NOISE"]
_LOGGER = logging.getLogger(__name__)

#: the significance level of the verdicts
ALPHA = 0.05
#: the verdict when no test supports the difference
NOISE = "noise (not supported)"


def _beta_cf(a, b, x, iters=500, eps=1e-15):
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            h *= step
        if abs(step - 1.0) < eps:
            break
    return h


def regularized_beta(a, b, x):
    """The regularized incomplete beta function ``I_x(a, b)`` (``a, b > 0``, ``0 ≤ x ≤ 1``)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast on one side of the mean; use the symmetry on the other
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def paired_t_test(diffs):
    """Student's paired t-test of per-seed differences against zero.

    Parameters
    ----------
    diffs : array-like, shape ``(n,)``
        A − B per seed.

    Returns
    -------
    (t, p) : (float, float) or (None, None)
        The t statistic and the two-sided p-value with ``n − 1`` degrees of freedom; ``None``
        with fewer than two differences. Differences all equal: ``t`` infinite and ``p = 0``
        (all zero: ``t = 0``, ``p = 1``).
    """
    d = np.asarray(diffs, np.float64).ravel()
    n = len(d)
    if n < 2:
        return None, None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    # P(|T| ≥ |t|) for Student's t with df degrees of freedom = I_{df/(df+t²)}(df/2, 1/2)
    p = regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return t, min(1.0, max(0.0, p))


def mcnemar_counts(pred_a, pred_b, labels):
    """``(b, c)``: images A classifies right and B wrong, and the other way round.

    Parameters
    ----------
    pred_a, pred_b, labels : array-like of int, shape ``(N,)``
        Predicted classes of A and B, and the true classes, on the same images.
    """
    pred_a, pred_b, labels = (np.asarray(v).ravel() for v in (pred_a, pred_b, labels))
    if not len(pred_a) == len(pred_b) == len(labels):
        raise ValueError(f"predictions of {len(pred_a)} and {len(pred_b)} images for "
                         f"{len(labels)} labels")
    right_a, right_b = pred_a == labels, pred_b == labels
    return int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))


def mcnemar_exact_p(b, c):
    """McNemar's exact test: the two-sided binomial p of ``min(b, c)`` out of ``b + c`` at 1/2.

    Exact in integers (``p = 2 · Σ_{k ≤ min(b,c)} C(n, k) / 2^n``, at most 1); ``b + c = 0``:
    ``p = 1`` (no discordant image, no evidence).
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be ≥ 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, total = 1, 1                         # C(n, 0)
    for i in range(k):                        # C(n, i + 1) = C(n, i) · (n − i) / (i + 1)
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / (1 << n))


def verdict(a, b, diff_mean, p_seeds, p_mcnemar, alpha=ALPHA):
    """What the two tests support, in words.

    Parameters
    ----------
    a, b : str
        The names of the sides (the difference is A − B).
    diff_mean : float
        Mean A − B (points); its sign names the side ahead.
    p_seeds : float or None
        The paired t-test's p (``None``: one seed, not tested).
    p_mcnemar : float

    Returns
    -------
    str
        ``"<side> better (seeds and McNemar)"`` when both tests reject at ``alpha``;
        ``"<side> ahead per-image only (seeds do not support it)"`` when only McNemar does
        (``... (1 seed: not tested over seeds)`` with one seed); ``"<side> ahead over seeds only
        (McNemar does not support it)"`` when only the t-test does; else :data:`NOISE`.
    """
    ahead = a if diff_mean > 0 else b
    seeds_sig = p_seeds is not None and p_seeds < alpha
    images_sig = p_mcnemar < alpha
    if seeds_sig and images_sig:
        return f"{ahead} better (seeds and McNemar)"
    if images_sig:
        why = "1 seed: not tested over seeds" if p_seeds is None else "seeds do not support it"
        return f"{ahead} ahead per-image only ({why})"
    if seeds_sig:
        return f"{ahead} ahead over seeds only (McNemar does not support it)"
    return NOISE


def format_p(p, seeds=None):
    """A p-value to read: ``0.039``, ``<0.001``; ``None`` → ``n/a (1 seed)`` (or ``n/a``)."""
    if p is None:
        return f"n/a ({seeds} seed{'s' if seeds != 1 else ''})" if seeds is not None else "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


@dataclass
class PairResult:
    """One pair's figures (every top-1 in percent, every difference in points).

    Attributes
    ----------
    a, b : str
        The sides (``NAME`` or ``NAME:int8``); the difference is A − B.
    seeds : list of int
        The seeds both sides ran, paired.
    a_top1, b_top1, diffs : list of float
        Per seed, from the per-image predictions.
    a_mean, b_mean, diff_mean : float
    diff_std : float or None
        Sample std of the per-seed differences (``None`` with one seed).
    t, p_seeds : float or None
        The paired t-test (``None`` with one seed).
    images : int
        Images pooled over the seeds.
    b_count, c_count : int
        McNemar's ``b`` (A right, B wrong) and ``c`` (A wrong, B right).
    p_mcnemar : float
    verdict : str
    """
    a: str
    b: str
    seeds: List[int]
    a_top1: List[float]
    b_top1: List[float]
    diffs: List[float]
    a_mean: float
    b_mean: float
    diff_mean: float
    diff_std: Optional[float]
    t: Optional[float]
    p_seeds: Optional[float]
    images: int
    b_count: int
    c_count: int
    p_mcnemar: float
    verdict: str
    alpha: float = ALPHA
    notes: List[str] = field(default_factory=list)

    @property
    def label(self):
        return f"{self.a} − {self.b}"

    def to_dict(self):
        """Every figure as plain data (``compare.json``)."""
        d = asdict(self)
        if d["t"] is not None and math.isinf(d["t"]):
            d["t"] = str(d["t"])                 # JSON has no infinity
        return d


def _top1(pred, labels):
    if not len(labels):
        return float("nan")
    return float(np.mean(np.asarray(pred) == np.asarray(labels)) * 100.0)


def pair_result(a, b, per_seed, alpha=ALPHA):
    """The paired figures of A − B.

    Parameters
    ----------
    a, b : str
        The sides' names.
    per_seed : dict
        seed → ``(pred_a, pred_b, labels)``, int arrays of shape ``(N,)`` on the same images
        (``N`` may differ between seeds). At least one seed.

    Returns
    -------
    PairResult
    """
    if not per_seed:
        raise ValueError(f"no seed that both {a} and {b} ran")
    seeds = sorted(per_seed)
    a_top1, b_top1, bc, images = [], [], [0, 0], 0
    for s in seeds:
        pa, pb, y = per_seed[s]
        a_top1.append(_top1(pa, y))
        b_top1.append(_top1(pb, y))
        bs, cs = mcnemar_counts(pa, pb, y)
        bc[0] += bs
        bc[1] += cs
        images += len(y)
    diffs = [x - y for x, y in zip(a_top1, b_top1)]
    t, p_seeds = paired_t_test(diffs)
    p_mc = mcnemar_exact_p(*bc)
    diff_mean = float(np.mean(diffs))
    return PairResult(a, b, seeds, a_top1, b_top1, diffs, float(np.mean(a_top1)),
                      float(np.mean(b_top1)), diff_mean,
                      float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None, t, p_seeds,
                      images, bc[0], bc[1], p_mc, verdict(a, b, diff_mean, p_seeds, p_mc, alpha),
                      alpha)
