"""Group criteria (group_l2, group_taylor): a channel's score reads every slice of its coupled
group, checked against a hand computation on a conv → BatchNorm → conv → FC graph."""
import mxnet as mx
import numpy as np
import pytest

from distill.pruning.base import CRITERIA
from distill.pruning.graph import analyze
from distill.pruning.plan import unit_scores


def _graph():
    x = mx.sym.var("data")
    c1 = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    b1 = mx.sym.BatchNorm(c1, fix_gamma=False, name="b1")
    r1 = mx.sym.Activation(b1, act_type="relu", name="r1")
    c2 = mx.sym.Convolution(r1, num_filter=3, kernel=(1, 1), no_bias=True, name="c2")
    p = mx.sym.Pooling(c2, global_pool=True, pool_type="avg", kernel=(1, 1), name="gap")
    fc = mx.sym.FullyConnected(mx.sym.Flatten(p), num_hidden=2, name="fc")
    rng = np.random.RandomState(0)
    params = {"c1_weight": rng.randn(4, 1, 3, 3), "c1_bias": rng.randn(4),
              "b1_gamma": rng.randn(4), "b1_beta": rng.randn(4),
              "b1_moving_mean": rng.randn(4), "b1_moving_var": rng.rand(4) + 0.5,
              "c2_weight": rng.randn(3, 4, 1, 1), "fc_weight": rng.randn(2, 3), "fc_bias": rng.randn(2)}
    return analyze(fc, (1, 1, 6, 6)), params, rng


def _scores(graph, params, name, grads=None):
    crit = CRITERIA.get(name)()
    return crit, unit_scores(graph, graph.groups, crit, params, grads, np.random.RandomState(0))


def _units_of(graph, param, axis):
    """Unit id of every index of ``param`` along ``axis`` (its 'out' or 'in' slice)."""
    s = next(s for s in graph.slices if s.param == param and s.axis == axis)
    return s.classes


def test_group_l2_sums_producer_consumer_and_gamma_then_normalises():
    graph, params, _ = _graph()
    _, scores = _scores(graph, params, "group_l2")
    units = _units_of(graph, "c1_weight", 0)          # the 4 channels c1 makes
    w1, g, w2 = params["c1_weight"], params["b1_gamma"], params["c2_weight"]
    raw = np.array([(w1[c] ** 2).sum() + g[c] ** 2 + (w2[:, c] ** 2).sum() for c in range(4)])
    want = raw / raw.mean()
    got = np.array([scores[int(u)] for u in units])
    assert np.allclose(got, want, rtol=1e-12)
    # c1's bias and BatchNorm's beta and statistics are not read: changing them changes nothing
    moved = dict(params, c1_bias=params["c1_bias"] * 100, b1_beta=params["b1_beta"] * 100,
                 b1_moving_var=params["b1_moving_var"] * 100)
    _, again = _scores(graph, moved, "group_l2")
    assert all(again[int(u)] == scores[int(u)] for u in units)
    # the second group (c2's 3 channels) reads c2's filters and the classifier's columns
    units2 = _units_of(graph, "c2_weight", 0)
    raw2 = np.array([(w2[k] ** 2).sum() + (params["fc_weight"][:, k] ** 2).sum() for k in range(3)])
    assert np.allclose([scores[int(u)] for u in units2], raw2 / raw2.mean(), rtol=1e-12)


def test_l1_reads_only_the_filters_group_l2_sees_the_consumer():
    """Scaling a consumer's input column changes group_l2's ranking, not l1's."""
    graph, params, _ = _graph()
    units = _units_of(graph, "c1_weight", 0)
    weak = int(np.argmin([_scores(graph, params, "group_l2")[1][int(u)] for u in units]))
    boosted = dict(params, c2_weight=params["c2_weight"].copy())
    boosted["c2_weight"][:, weak] *= 50
    l1_a, l1_b = _scores(graph, params, "l1")[1], _scores(graph, boosted, "l1")[1]
    assert all(l1_a[int(u)] == l1_b[int(u)] for u in units)
    g = _scores(graph, boosted, "group_l2")[1]
    assert int(np.argmax([g[int(u)] for u in units])) == weak


def test_group_taylor_is_the_absolute_sum_of_w_times_g_over_the_group():
    graph, params, rng = _graph()
    grads = {k: rng.randn(*np.shape(v)) for k, v in params.items()}
    crit, scores = _scores(graph, params, "group_taylor", grads)
    assert crit.needs_grad
    units = _units_of(graph, "c1_weight", 0)
    w1, g, w2 = params["c1_weight"], params["b1_gamma"], params["c2_weight"]
    raw = np.abs([(w1[c] * grads["c1_weight"][c]).sum() + g[c] * grads["b1_gamma"][c]
                  + (w2[:, c] * grads["c2_weight"][:, c]).sum() for c in range(4)])
    assert np.allclose([scores[int(u)] for u in units], raw / raw.mean(), rtol=1e-12)


@pytest.mark.parametrize("name", ["group_taylor"])   # group_l2 shares the path, without gradients
def test_group_criteria_train_through_the_channel_pruner(name, tmp_path):
    """A short channel-pruning run with the group criterion end to end (the pruner tracks the
    consumers' gradients for group_taylor), after a targeted group-lasso epoch, the classifier
    keeping only its outputs."""
    import json
    import os
    from helpers import run_cli, tiny_teacher
    import yaml
    t = tiny_teacher(tmp_path, epochs=1)
    with open(t) as f:
        r = yaml.safe_load(f)
    r.update(name="grp", student={"from": "teacher"}, teacher={"recipe": os.path.basename(t)},
             pruning={"enabled": True, "granularity": "channel", "criterion": name,
                      "final_sparsity": 0.5, "start_epoch": 1, "end_epoch": 1, "round_to": 4,
                      "scope": "global", "keep_outputs": ["last"], "exclude": ["first"],
                      "regularize": {"kind": "group_l2", "strength": 1e-3, "targeted": True}},
             distillation=[{"loss": "kd", "weight": 0.7, "temperature": 4.0}, {"loss": "ce", "weight": 0.3}])
    r["trainer"]["epochs"] = 2
    r["output"]["dir"] = str(tmp_path / "runs" / "grp")
    path = tmp_path / "grp.yaml"
    path.write_text(yaml.safe_dump(r))
    res = run_cli(str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(tmp_path / "runs" / "grp" / "metrics.json"))
    assert m["student"]["top1"] > 0 and m["student"]["macs"] < m["teacher"]["macs"]


# -- channel blocks: round_to auto, round_mode ----------------------------------------------------

@pytest.mark.parametrize("mode,keep", [("up", 16), ("down", 8), ("nearest", 16)])
def test_round_mode_rounds_the_kept_width(mode, keep):
    from distill.pruning.blocks import Rounding
    from distill.pruning.plan import round_keep
    # 64 channels, 13 to keep (≈ 80% pruned), blocks of 8: up 16, down 8, nearest 16 (13/8=1.6)
    assert round_keep(64, 13, 1, Rounding(8, mode)) == keep
    assert round_keep(64, 11, 1, Rounding(8, "nearest")) == 8          # 11/8 = 1.4 → 1 block
    assert round_keep(64, 3, 1, Rounding(8, "down")) == 8              # at least one block
    assert round_keep(64, 13, 1, 8) == 16                              # a plain int: up, as before
    assert round_keep(16, 15, 1, Rounding(8, "up")) == 16              # nothing below: unpruned


def test_round_to_auto_picks_the_backends_block(monkeypatch):
    from distill.pruning import blocks
    from distill.recipe import PruningConfig, PruningTarget
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(blocks, "_cpu_flags", lambda: {"avx2", "avx512f"})
    cfg = PruningConfig(enabled=True, round_to="auto", round_mode="down")
    cfg.validate("pruning")
    r = blocks.rounding(cfg)
    assert (int(r), r.mode) == (16, "down") and "AVX-512" in r.why
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert int(blocks.rounding(cfg)) == 8
    monkeypatch.setattr(blocks, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    assert int(blocks.rounding(cfg)) == 8
    cfg.target = PruningTarget(latency=0.5, backend="ncnn")
    assert int(blocks.rounding(cfg)) == blocks.NCNN_BLOCK and "ncnn" in blocks.rounding(cfg).why
    assert int(blocks.rounding(PruningConfig(round_to=4))) == 4


@pytest.mark.parametrize("key,value", [("round_to", "big"), ("round_to", 0), ("round_mode", "sideways")])
def test_round_keys_are_checked(key, value):
    from distill.errors import UserError
    from distill.recipe import PruningConfig
    with pytest.raises(UserError, match=f"pruning.{key}"):
        PruningConfig(enabled=True, **{key: value}).validate("pruning")


def test_choose_removed_follows_the_mode():
    """c1's group has 4 channels; 30% of them is 1.2 → 1 removed, 3 kept = 1.5 blocks of 2:
    rounded up that is 4 (nothing pruned, today's rule), down 2 (two removed), nearest 4."""
    from distill.pruning.blocks import Rounding
    from distill.pruning.plan import choose_removed
    graph, params, _ = _graph()
    _, scores = _scores(graph, params, "group_l2")
    g = next(g for g in graph.groups if len(g.unit_ids) == 4)
    cut = {m: choose_removed(graph, scores, {g.id: 0.3}, Rounding(2, m)) for m in ("up", "down", "nearest")}
    assert (len(cut["up"]), len(cut["down"]), len(cut["nearest"])) == (0, 2, 0)
    lowest = sorted(g.unit_ids.tolist(), key=lambda u: scores[u])[:2]
    assert sorted(cut["down"]) == sorted(lowest)                  # the lowest group_l2 scores go


def test_group_slices_options_add_beta_and_drop_depthwise_filters():
    """``pruning.group_slices``: ``beta: true`` adds BatchNorm's shift to the hand sum;
    ``depthwise: true`` adds a depthwise conv's filters (left out by default, as Torch-Pruning
    leaves them out)."""
    graph, params, _ = _graph()
    crit = CRITERIA.get("group_l2")(beta=True)
    scores = unit_scores(graph, graph.groups, crit, params, None, np.random.RandomState(0))
    units = _units_of(graph, "c1_weight", 0)
    w1, g, b, w2 = params["c1_weight"], params["b1_gamma"], params["b1_beta"], params["c2_weight"]
    raw = np.array([(w1[c] ** 2).sum() + g[c] ** 2 + b[c] ** 2 + (w2[:, c] ** 2).sum() for c in range(4)])
    assert np.allclose([scores[int(u)] for u in units], raw / raw.mean(), rtol=1e-12)
    # a depthwise conv inside the group: its filters count unless depthwise: false
    x = mx.sym.var("data")
    c1 = mx.sym.Convolution(x, num_filter=4, kernel=(1, 1), no_bias=True, name="c1")
    dw = mx.sym.Convolution(c1, num_filter=4, num_group=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name="dw")
    c2 = mx.sym.Convolution(dw, num_filter=3, kernel=(1, 1), no_bias=True, name="c2")
    p = mx.sym.Pooling(c2, global_pool=True, pool_type="avg", kernel=(1, 1))
    fc = mx.sym.FullyConnected(mx.sym.Flatten(p), num_hidden=2, name="fc")
    rng = np.random.RandomState(1)
    ps = {"c1_weight": rng.randn(4, 1, 1, 1), "dw_weight": rng.randn(4, 1, 3, 3),
          "c2_weight": rng.randn(3, 4, 1, 1), "fc_weight": rng.randn(2, 3), "fc_bias": rng.randn(2)}
    g2 = analyze(fc, (1, 1, 6, 6))
    u = _units_of(g2, "c1_weight", 0)
    for depthwise in (True, False, None):         # None: the default, which leaves them out
        crit = CRITERIA.get("group_l2")(**({} if depthwise is None else {"depthwise": depthwise}))
        sc = unit_scores(g2, g2.groups, crit, ps, None, np.random.RandomState(0))
        raw = np.array([(ps["c1_weight"][c] ** 2).sum() + (ps["c2_weight"][:, c] ** 2).sum()
                        + (ps["dw_weight"][c] ** 2).sum() * bool(depthwise) for c in range(4)])
        assert np.allclose([sc[int(k)] for k in u], raw / raw.mean(), rtol=1e-12), depthwise


def test_group_slices_key_needs_a_group_criterion():
    from distill.errors import UserError
    from distill.recipe import recipe_from_dict
    r = recipe_from_dict({"pruning": {"enabled": True, "group_slices": {"beta": True, "depthwise": False}}})
    assert r.pruning.criterion_options() == {"beta": True, "depthwise": False}
    with pytest.raises(UserError, match="pruning.group_slices"):
        recipe_from_dict({"pruning": {"enabled": True, "criterion": "l1", "group_slices": {"beta": True}}})
