"""Every registered loss term against a hand-computed value on a tiny input."""
import json
import math
import os

import mxnet as mx
import numpy as np
import pytest

from distill.errors import UserError
from distill.losses import LOSSES, build_loss
from distill.losses.dkd import warmup_factor
from distill.recipe import LossTerm, recipe_from_dict
from helpers import run_cli, tiny_student, tiny_teacher

LN3 = math.log(3.0)

# every registered loss with its default options, plus the options that change a term's graph
CASES = [(n, {}) for n in LOSSES.names()] + [("kd", {"standardize": True}), ("dkd", {"standardize": True})]
CASE_IDS = [n + "".join(f"-{k}" for k in o) for n, o in CASES]


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


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_every_loss_gives_per_sample_finite_gradients(name, options):
    rs = np.random.RandomState(0)
    feature = LOSSES.get(name).layers != "logits"
    s_shape, t_shape = ((4, 3, 4, 4), (4, 6, 2, 2)) if feature else ((4, 5), (4, 5))
    term = build_loss(LossTerm(loss=name, teacher_layer="t" if feature else None,
                               student_layer="s" if feature else None, options=dict(options)),
                      s_shape, t_shape)
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


@pytest.mark.parametrize("name,options", [c for c in CASES if LOSSES.get(c[0]).hybridizable],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if LOSSES.get(c[0]).hybridizable])
def test_hybridized_loss_equals_imperative(name, options):
    """The run hybridizes every term that allows it: values and gradients must not change."""
    rs = np.random.RandomState(1)
    feature = LOSSES.get(name).layers != "logits"
    s_shape, t_shape = ((4, 3, 4, 4), (4, 6, 2, 2)) if feature else ((4, 5), (4, 5))
    term = LossTerm(loss=name, teacher_layer="t" if feature else None,
                    student_layer="s" if feature else None, options=dict(options))
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


# -- dkd, dist, standardize: numpy references written from the papers' formulas ---------------

S = np.array([[2.0, 0.5, -1.0, 0.3], [-0.4, 1.2, 0.8, -2.0]])      # student logits, 2 × 4
T = np.array([[0.5, 1.5, 0.2, -0.7], [1.0, -0.3, 2.5, 0.1]])       # teacher
Y = np.array([0, 2])                                                 # labels
# values in float64: MXNet's float32 log_softmax is off by ~3e-6 here, 4e-4 after DKD's T²·β = 128
# (the float32 graphs are the registry tests' subject)
RTOL = 1e-6


def _nd64(a):
    return mx.nd.array(np.array(a), dtype="float64")


def _term64(loss, **options):
    term = build_loss(LossTerm(loss=loss, options=options))
    term.initialize()
    term.cast("float64")
    return term


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def _np_dkd(s, t, y, temp, alpha, beta):
    """Per sample: TCKD on [p_target, 1 − p_target]; NCKD on the softmax of the logits with the
    target class removed (np.delete: no masking constant involved)."""
    out = []
    for si, ti, yi in zip(s, t, y):
        ps, pt = _softmax(si / temp), _softmax(ti / temp)
        tckd = _kl(np.array([pt[yi], 1 - pt[yi]]), np.array([ps[yi], 1 - ps[yi]]))
        nckd = _kl(_softmax(np.delete(ti, yi) / temp), _softmax(np.delete(si, yi) / temp))
        out.append(temp ** 2 * (alpha * tckd + beta * nckd))
    return np.array(out)


def _dkd(**options):
    return _term64("dkd", **{"warmup_epochs": 0.0, **options})


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 1.0), (1.0, 8.0)])
def test_dkd_hand_value_tckd_and_nckd(alpha, beta):
    term = _dkd(alpha=alpha, beta=beta, temperature=2.0)
    out = term(_nd64(S), _nd64(Y), _nd64(T)).asnumpy()
    np.testing.assert_allclose(out, _np_dkd(S, T, Y, 2.0, alpha, beta), rtol=RTOL, atol=1e-12)


def test_dkd_nckd_ignores_the_target_logit():
    """Student = teacher except at the target: the non-target distributions agree, so NCKD is 0
    and TCKD is not (it is KD's binary part). A mask on the wrong class, or none, fails this."""
    s = T.copy()
    s[np.arange(2), Y] += np.array([3.0, -2.0])
    nckd = _dkd(alpha=0.0, beta=1.0)(_nd64(s), _nd64(Y), _nd64(T)).asnumpy()
    tckd = _dkd(alpha=1.0, beta=0.0)(_nd64(s), _nd64(Y), _nd64(T)).asnumpy()
    np.testing.assert_allclose(nckd, [0.0, 0.0], atol=1e-12)
    assert (tckd > 0.1).all()
    np.testing.assert_allclose(tckd, _np_dkd(s, T, Y, 4.0, 1.0, 0.0), rtol=RTOL)


def test_dkd_warmup_factor_follows_the_epoch_in_the_hybridized_graph():
    """w = min(e / warmup_epochs, 1), e the 1-based epoch (mdistiller's count): the loop's epoch
    index 0, 4, 9 of 10 warm-up epochs → 0.1, 0.5, 1; a hybridized term reads each new value."""
    assert [warmup_factor(e, 10) for e in (0, 4, 9, 30)] == [0.1, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    term = _term64("dkd", warmup_epochs=10.0)
    term.hybridize(static_alloc=True)
    full = _np_dkd(S, T, Y, 4.0, 1.0, 8.0)
    before = term(_nd64(S), _nd64(Y), _nd64(T)).asnumpy()          # no epoch set: full weight
    np.testing.assert_allclose(before, full, rtol=RTOL)
    for epoch, w in ((0, 0.1), (4, 0.5), (9, 1.0), (25, 1.0)):
        term.set_epoch(epoch)
        np.testing.assert_allclose(term(_nd64(S), _nd64(Y), _nd64(T)).asnumpy(), w * full, rtol=RTOL)


def _pearson_rows(a, b):
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


@pytest.mark.parametrize("beta,gamma", [(1.0, 0.0), (0.0, 1.0), (2.0, 0.5)])
def test_dist_hand_value_inter_and_intra(beta, gamma):
    s, t = np.vstack([S, S[:1] * 0.5]), np.vstack([T, T[1:] - 1.0])      # 3 samples: columns vary
    tau = 2.0
    ps, pt = _softmax(s / tau), _softmax(t / tau)
    inter = 1 - _pearson_rows(ps, pt)                     # per sample, over classes
    intra = np.mean(1 - _pearson_rows(ps.T, pt.T))        # per class, over the batch
    term = _term64("dist", beta=beta, gamma=gamma, tau=tau)
    out = term(_nd64(s), None, _nd64(t)).asnumpy()
    np.testing.assert_allclose(out, tau ** 2 * (beta * inter + gamma * intra), rtol=RTOL, atol=1e-12)
    assert out.mean() == pytest.approx(tau ** 2 * (beta * inter.mean() + gamma * intra), rel=RTOL)


def test_dist_one_sample_batch_has_finite_gradients():
    """One sample: every class column is constant, the intra-class correlation is 0 (ε), not NaN."""
    term = _term64("dist")
    x = _nd64(S[:1])
    x.attach_grad()
    with mx.autograd.record():
        out = term(x, None, _nd64(T[:1]))
    out.backward()
    inter = 1 - _pearson_rows(_softmax(S[:1]), _softmax(T[:1]))
    np.testing.assert_allclose(out.asnumpy(), inter + 1.0, rtol=RTOL)
    assert np.isfinite(x.grad.asnumpy()).all()


def _np_standardize(z):
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def test_kd_standardize_hand_value_and_invariance():
    temp = 2.0
    zs, zt = _np_standardize(S), _np_standardize(T)
    want = [temp ** 2 * _kl(_softmax(b / temp), _softmax(a / temp)) for a, b in zip(zs, zt)]
    std = _term64("kd", temperature=temp, standardize=True)
    np.testing.assert_allclose(std(_nd64(S), None, _nd64(T)).asnumpy(), want, rtol=RTOL)
    # a per-sample scale and shift of either side's logits does not change it; plain KD does change
    moved = S * np.array([[3.0], [0.5]]) + np.array([[7.0], [-2.0]])
    np.testing.assert_allclose(std(_nd64(moved), None, _nd64(T)).asnumpy(), want, rtol=RTOL)
    plain = _term64("kd", temperature=temp)
    assert not np.allclose(plain(_nd64(moved), None, _nd64(T)).asnumpy(),
                           plain(_nd64(S), None, _nd64(T)).asnumpy())
    assert build_loss(LossTerm(loss="kd")).standardize is False


def test_dkd_standardize_uses_standardized_logits():
    got = _dkd(standardize=True)(_nd64(S), _nd64(Y), _nd64(T)).asnumpy()
    np.testing.assert_allclose(got, _np_dkd(_np_standardize(S), _np_standardize(T), Y, 4.0, 1.0, 8.0),
                               rtol=RTOL)


@pytest.mark.parametrize("loss,options,key,words", [
    ("dkd", {"gama": 1.0}, "gama", ["alpha", "beta", "temperature", "warmup_epochs", "standardize"]),
    ("dist", {"temperature": 2.0}, "temperature", ["beta", "gamma", "tau"]),
    ("kd", {"standardise": True}, "standardise", ["standardize", "temperature"]),
    ("dkd", {"beta": -1.0}, "beta", ["≥ 0"]),
    ("dkd", {"temperature": 0.0}, "temperature", ["> 0"]),
    ("dist", {"tau": 0.0}, "tau", ["> 0"]),
    ("kd", {"standardize": 1}, "standardize", ["true or false"]),
    ("dkd", {"alpha": True}, "alpha", ["numbers"]),
])
def test_new_options_are_checked_by_the_recipe(loss, options, key, words):
    raw = {"teacher": {"model": "cifar_resnet20_v1"}, "distillation": [{"loss": loss, **options}]}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    msg = str(e.value)
    assert f"distillation[0].{key}" in msg and all(w in msg for w in words), msg


def test_dkd_without_labels_is_a_recipe_error():
    raw = {"data": {"labels": False}, "teacher": {"model": "cifar_resnet20_v1"},
           "distillation": [{"loss": "dist"}, {"loss": "dkd", "beta": 2.0}]}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    msg = str(e.value)
    assert "distillation[1]" in msg and "needs labels" in msg and "target class" in msg
    assert "`kd` or `dist`" in msg and "\n" not in msg
    raw["distillation"] = [{"loss": "dist"}, {"loss": "kd", "standardize": True}]
    r = recipe_from_dict(raw)                             # label-free terms stay allowed
    assert r.distillation[1].options == {"standardize": True}


def test_qat_keeps_dkd_and_dist_with_dkd_warmup_off():
    """QAT fine-tunes a trained student: its terms are the run's, dkd without a warm-up."""
    from distill.quantize.qat.train import qat_terms
    recipe = recipe_from_dict({"teacher": {"model": "cifar_resnet20_v1"}, "distillation": [
        {"loss": "dkd", "weight": 0.5}, {"loss": "dist", "weight": 2.0}, {"loss": "ce", "weight": 1.0}]})
    terms = qat_terms(recipe, has_teacher=True, labelled=True, log=lambda *a: None)
    assert [(t.name, t.weight) for t in terms] == [("dkd", 0.5), ("dist", 2.0), ("ce", 1.0)]
    terms[0].block.set_epoch(0)
    assert terms[0].block.warmup.data().asscalar() == 1.0
    assert recipe.distillation[0].options == {}          # the recipe itself is not changed


def test_cli_one_epoch_with_dkd_dist_and_standardized_kd(tmp_path):
    """dkd, dist and kd + standardize through the CLI, teacher outputs cached and live: each
    term's epoch loss is finite and both cache modes give the same (lr ≈ 0, as test_train's
    cache test, so the student stays put and the losses compare the teacher outputs). The loop
    tells dkd the epoch: with 2 warm-up epochs, epoch 1 counts half of a twin without warm-up."""
    res = run_cli("distill", "list")
    assert res.returncode == 0 and "dkd" in res.stdout and "dist" in res.stdout
    t = tiny_teacher(tmp_path, epochs=1, num_samples=256)
    terms = [{"loss": "dkd", "weight": 1.0, "warmup_epochs": 2}, {"loss": "dist", "weight": 1.0},
             {"loss": "kd", "weight": 0.5, "standardize": True}, {"loss": "ce", "weight": 1.0},
             {"loss": "dkd", "weight": 0.0, "warmup_epochs": 0}]
    rows = {}
    for mode in ("memory", "off"):
        s = tiny_student(tmp_path, t, name=f"new_{mode}", epochs=1, distillation=terms,
                         trainer={"teacher_cache": mode, "lr": 1e-8, "teacher_cache_shared": False},
                         output={"latency": False})
        res = run_cli(s)
        assert res.returncode == 0, res.stderr[-2000:]
        assert ("cached once (memory" if mode == "memory" else "computed live") in res.stdout
        with open(os.path.join(tmp_path, "runs", f"new_{mode}", "metrics.json")) as f:
            rows[mode] = json.load(f)["history"][0]
    losses = rows["memory"]["losses"]
    assert sorted(losses) == ["ce", "dist", "dkd1", "dkd2", "kd"]
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert losses["dkd1"] == pytest.approx(0.5 * losses["dkd2"], rel=1e-5)
    for k, v in losses.items():
        assert rows["off"]["losses"][k] == pytest.approx(v, rel=1e-5), k
    bad = tiny_student(tmp_path, t, name="dkd_nolabels", epochs=1, data={"labels": False},
                       distillation=[{"loss": "dkd"}])
    res = run_cli(bad)
    assert res.returncode == 2 and "needs labels" in res.stderr and "Traceback" not in res.stderr
