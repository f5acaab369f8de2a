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
    kd = build_loss(LossTerm(loss="kd", options={"temperature": 2.0}))
    out = kd(_nd([[0.0, 0.0]]), None, _nd([[2 * LN3, 0.0]])).asnumpy()
    assert out.shape == (1,)
    assert out[0] == pytest.approx(4 * 0.1308120, abs=1e-5)


def test_kd_zero_when_equal_and_hybridizes():
    kd = build_loss(LossTerm(loss="kd", options={"temperature": 4.0}))
    kd.hybridize()
    logits = _nd([[1.0, -2.0, 0.5], [0.3, 0.2, 0.1]])
    np.testing.assert_allclose(kd(logits, None, logits).asnumpy(), [0, 0], atol=1e-6)


def test_ce_hand_value():
    ce = build_loss(LossTerm(loss="ce"))
    out = ce(_nd([[0.0, LN3], [LN3, 0.0]]), _nd([1, 1]), None).asnumpy()
    np.testing.assert_allclose(out, [-math.log(0.75), -math.log(0.25)], atol=1e-5)


def test_hint_hand_value_same_and_adapted_channels():
    same = build_loss(LossTerm(loss="hint", teacher_layer="t", student_layer="s"), (1, 1, 1, 1), (1, 1, 1, 1))
    assert same.adapter is None
    assert same(_nd([[[[2.0]]]]), None, _nd([[[[5.0]]]])).asnumpy()[0] == pytest.approx(9.0)
    ad = build_loss(LossTerm(loss="hint", teacher_layer="t", student_layer="s"), (1, 1, 1, 1), (1, 2, 1, 1))
    ad.initialize()
    ad.adapter.weight.set_data(mx.nd.ones((2, 1, 1, 1)))
    # adapter maps 2 → [2, 2]; teacher [1, 3]: ((2-1)² + (2-3)²) / 2 = 1
    assert ad(_nd([[[[2.0]]]]), None, _nd([[[[1.0]], [[3.0]]]])).asnumpy()[0] == pytest.approx(1.0)


def test_hint_resizes_student_map():
    h = build_loss(LossTerm(loss="hint", teacher_layer="t", student_layer="s"), (1, 1, 2, 2), (1, 1, 1, 1))
    # 2×2 student map [1, 2, 3, 6] pools to 3; teacher 1: (3 - 1)² = 4
    assert h(_nd([[[[1, 2], [3, 6]]]]), None, _nd([[[[1.0]]]])).asnumpy()[0] == pytest.approx(4.0)


def test_attention_hand_value():
    at = build_loss(LossTerm(loss="attention", options={"p": 2.0}), (1, 1, 1, 2), (1, 2, 1, 2))
    # A_s = normalize([1, 0]) = [1, 0]; A_t = normalize(mean_c [[0,1],[0,1]]²) = [0, 1]
    out = at(_nd([[[[1.0, 0.0]]]]), None, _nd([[[[0.0, 1.0]], [[0.0, 1.0]]]])).asnumpy()
    assert out[0] == pytest.approx(1.0, abs=1e-5)


def test_similarity_hand_value():
    sp = build_loss(LossTerm(loss="similarity"))
    # G_s = I; G_t rows = [1/√2, 1/√2]; ‖G_s − G_t‖²/N² = 2(0.0858 + 0.5)/4 = 0.29289
    out = sp(_nd([[1.0, 0.0], [0.0, 1.0]]), None, _nd([[1.0, 0.0], [1.0, 0.0]])).asnumpy()
    assert out.mean() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-5)


def test_rkd_hand_value():
    rkd = build_loss(LossTerm(loss="rkd", options={"distance_weight": 25.0, "angle_weight": 50.0}))
    # 1-D points s = 0, 1, 3 and t = 0, 1, 2: mean-normalized distances (0.5, 1.5, 1) vs
    # (0.75, 1.5, 0.75); Huber 0.5·0.25² on 4 of 9 entries = 0.125/9; angles agree (same order)
    out = rkd(_nd([[0.0], [1.0], [3.0]]), None, _nd([[0.0], [1.0], [2.0]])).asnumpy()
    assert out.mean() == pytest.approx(25 * 0.125 / 9, abs=1e-4)
    same = rkd(_nd([[0.0], [1.0], [2.0]]), None, _nd([[0.0], [2.0], [4.0]])).asnumpy()
    assert same.mean() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_gives_per_sample_finite_gradients(name):
    rs = np.random.RandomState(0)
    feature = name not in ("kd", "ce")
    s_shape, t_shape = ((4, 3, 4, 4), (4, 6, 2, 2)) if feature else ((4, 5), (4, 5))
    term = build_loss(LossTerm(loss=name, teacher_layer="t" if feature else None,
                               student_layer="s" if feature else None), s_shape, t_shape)
    term.initialize()
    s, t = _nd(rs.randn(*s_shape)), _nd(rs.randn(*t_shape))
    y = _nd([0, 1, 2, 3])
    s.attach_grad()
    with mx.autograd.record():
        out = term(s, y, t)
    out.backward()
    assert out.shape == (4,)
    assert np.isfinite(out.asnumpy()).all()
    assert np.isfinite(s.grad.asnumpy()).all() and np.abs(s.grad.asnumpy()).sum() > 0


def test_unknown_loss_lists_valid():
    from distill.errors import UserError
    with pytest.raises(UserError) as e:
        build_loss(LossTerm(loss="kld"))
    assert "kd" in str(e.value) and "ce" in str(e.value)


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if LOSSES.get(n).hybridizable])
def test_hybridized_loss_equals_imperative(name):
    """The run hybridizes every term that allows it: values and gradients must not change."""
    rs = np.random.RandomState(1)
    feature = name not in ("kd", "ce")
    s_shape, t_shape = ((4, 3, 4, 4), (4, 6, 2, 2)) if feature else ((4, 5), (4, 5))
    term = LossTerm(loss=name, teacher_layer="t" if feature else None,
                    student_layer="s" if feature else None)
    blocks = [build_loss(term, s_shape, t_shape) for _ in range(2)]
    for b in blocks:
        b.initialize(mx.init.Xavier())
    for pa, pb in zip(blocks[0].collect_params().values(), blocks[1].collect_params().values()):
        pb.set_data(pa.data())
    blocks[1].hybridize(static_alloc=True)
    s, t = _nd(rs.randn(*s_shape)), _nd(rs.randn(*t_shape))
    y = _nd([0, 1, 2, 3])
    got = []
    for b in blocks:
        for _ in range(2):                         # the second call runs the cached graph
            x = s.copy()
            x.attach_grad()
            with mx.autograd.record():
                out = b(x, y, t).mean()
            out.backward()
        got.append((out.asnumpy(), x.grad.asnumpy()))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])
