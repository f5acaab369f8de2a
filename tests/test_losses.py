"""Every registered loss term against a hand-computed value on a tiny input."""
import math

import mxnet as mx
import numpy as np
import pytest

from distill.losses import LOSSES, build_loss
from distill.recipe import LossTerm

LN3 = math.log(3.0)


def _nd(a):
    return mx.nd.array(np.array(a, dtype="float32"))


def test_kd_hand_value():
    # teacher softmax = [0.75, 0.25], student softmax = [0.5, 0.5]
    # KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120; times T² = 4 at T = 2
    kd = build_loss(LossTerm(loss="kd", temperature=2.0))
    out = kd(_nd([[0.0, 0.0]]), None, _nd([[2 * LN3, 0.0]])).asnumpy()
    assert out.shape == (1,)
    assert out[0] == pytest.approx(4 * 0.1308120, abs=1e-5)


def test_kd_zero_when_equal_and_hybridizes():
    kd = build_loss(LossTerm(loss="kd", temperature=4.0))
    kd.hybridize()
    logits = _nd([[1.0, -2.0, 0.5], [0.3, 0.2, 0.1]])
    np.testing.assert_allclose(kd(logits, None, logits).asnumpy(), [0, 0], atol=1e-6)


def test_ce_hand_value():
    ce = build_loss(LossTerm(loss="ce"))
    out = ce(_nd([[0.0, LN3], [LN3, 0.0]]), _nd([1, 1]), None).asnumpy()
    np.testing.assert_allclose(out, [-math.log(0.75), -math.log(0.25)], atol=1e-5)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_gives_per_sample_finite_gradients(name):
    term = build_loss(LossTerm(loss=name))
    s = _nd(np.random.RandomState(0).randn(4, 5))
    t = _nd(np.random.RandomState(1).randn(4, 5))
    y = _nd([0, 1, 2, 3])
    s.attach_grad()
    with mx.autograd.record():
        out = term(s, y, t)
    out.backward()
    assert out.shape == (4,)
    assert np.isfinite(s.grad.asnumpy()).all() and np.abs(s.grad.asnumpy()).sum() > 0


def test_unknown_loss_lists_valid():
    from distill.errors import UserError
    with pytest.raises(UserError) as e:
        build_loss(LossTerm(loss="kld"))
    assert "kd" in str(e.value) and "ce" in str(e.value)
