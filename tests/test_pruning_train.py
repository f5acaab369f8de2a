"""Pruning while training: criteria and schedules (registry-driven), masks that hold under
SGD with momentum, recipes, and end-to-end runs (channel: physically smaller; unstructured:
masked) including ``--resume``."""
import glob
import json
import os
import pickle
import shutil

import mxnet as mx
import numpy as np
import pytest
import yaml
from mxnet import autograd, gluon

from distill.checkpoint import read_checkpoint
from distill.errors import UserError
from distill.graphio import load_symbol_block
from distill.pruning import CRITERIA, SCHEDULES
from distill.pruning.apply import channel_masks
from distill.pruning.graph import analyze
from distill.pruning.modifier import MaskKeeper, build_modifiers, prunable_layers, resolve_patterns
from distill.pruning.plan import choose_removed
from distill.recipe import recipe_from_dict, recipe_to_dict
from tbread import read_scalars
from distill.graphio import make_block
from helpers import random_params, run_cli, tiny_teacher


# -- criteria and schedules: every registered one ---------------------------------------------

@pytest.mark.parametrize("name", CRITERIA.names())
def test_criteria_score_shapes(name):
    crit = CRITERIA.get(name)()
    rs = np.random.RandomState(0)
    w = rs.normal(size=(6, 3, 3, 3))
    g = rs.normal(size=w.shape)
    assert crit.element_scores(w, g, rng=rs).shape == w.shape
    rows = w.reshape(6, -1) * np.arange(1, 7)[:, None]      # row k is (k + 1)× larger
    s = crit.row_scores(rows, g.reshape(6, -1), rng=rs)
    assert s.shape == (6,) and np.isfinite(s).all()
    if name in ("l1", "l2", "bn_scale"):
        assert list(np.argsort(s)) == list(range(6))       # magnitude criteria rank by size


def test_taylor_is_first_order_loss_change():
    crit = CRITERIA.get("taylor")()
    w = np.array([[1.0, 2.0], [0.5, 0.5]])
    g = np.array([[0.1, -0.1], [2.0, 2.0]])
    np.testing.assert_allclose(crit.row_scores(w, g), [0.1, 2.0])
    np.testing.assert_allclose(crit.element_scores(w, g), np.abs(w * g))
    with pytest.raises(ValueError):
        crit.row_scores(w, None)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedules_reach_final_and_never_decrease(name):
    sch = SCHEDULES.get(name)(2, 6, 2)
    values = [sch.sparsity_at(e, 0.8) for e in range(10)]
    assert values[0] == values[1] == 0.0
    assert values[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_agp_is_cubic():
    sch = SCHEDULES.get("agp")(0, 3, 1)                    # updates at epochs 0, 1, 2, 3
    got = [sch.sparsity_at(e, 0.9) for e in range(4)]
    want = [0.9 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, want)
    assert SCHEDULES.get("iterative")(0, 3, 1).sparsity_at(1, 0.8) == pytest.approx(0.4)
    assert SCHEDULES.get("oneshot")(2, 9, 1).events() == [2]


# -- recipes -----------------------------------------------------------------------------------

def test_pruning_recipe_round_trips_and_rejects_bad_values():
    raw = {"pruning": {"enabled": True, "granularity": "unstructured", "criterion": "taylor",
                       "scope": "global", "schedule": "agp", "start_epoch": 1, "end_epoch": 3,
                       "final_sparsity": 0.9, "exclude": ["first", "*dense*"],
                       "overrides": [{"layers": "*stage3*", "final_sparsity": 0.5}]},
           "trainer": {"epochs": 5}}
    r = recipe_from_dict(raw)
    assert r.pruning.overrides[0].final_sparsity == 0.5
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe_to_dict(r)))) == r
    for bad, key in [({"criterion": "l3"}, "pruning.criterion"), ({"schedule": "cubic"}, "pruning.schedule"),
                     ({"granularity": "filter"}, "pruning.granularity"),
                     ({"final_sparsity": 1.0}, "pruning.final_sparsity"),
                     ({"end_epoch": 9}, "pruning.end_epoch"), ({"start_epoch": 5}, "pruning.start_epoch"),
                     ({"overrides": [{"layers": "x", "final_sparsity": -1}]}, "pruning.overrides[0].final_sparsity"),
                     ({"exlude": []}, "pruning.exlude")]:
        with pytest.raises(UserError) as e:
            recipe_from_dict({"pruning": {"enabled": True, **bad}, "trainer": {"epochs": 5}})
        assert key in str(e.value), (key, str(e.value))


def _small_graph():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu")
    y = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c1")
    y = mx.sym.BatchNorm(y, fix_gamma=False, name="bn1")
    x = mx.sym.Activation(x + y, act_type="relu")
    x = mx.sym.Convolution(x, num_filter=16, kernel=(1, 1), name="c2")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn2"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    return mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")


def test_patterns_that_match_nothing_are_user_errors():
    layers = prunable_layers(_small_graph())
    got = resolve_patterns(["first", "last", "c*", "c1_weight"], layers, "pruning.exclude")
    assert got == {"first": ["c0"], "last": ["fc"], "c*": ["c0", "c1", "c2"], "c1_weight": ["c1"]}
    with pytest.raises(UserError) as e:
        resolve_patterns(["conv_2"], layers, "pruning.exclude")
    assert "pruning.exclude" in str(e.value) and "conv_2" in str(e.value)


class _Split:
    def __init__(self, x, y):
        self.x, self.y = x, y


class _Data:
    def __init__(self, shape=(3, 8, 8), n=64, classes=4):
        rs = np.random.RandomState(0)
        self.train = _Split(rs.normal(size=(n,) + shape).astype("float32"), rs.randint(0, classes, n))
        self.val = _Split(rs.normal(size=(32,) + shape).astype("float32"), rs.randint(0, classes, 32))


def _prune_once(tmp, sym, pruning):
    """Build the recipe's modifiers for ``sym`` (random weights), update once, finalize."""
    os.makedirs(str(tmp), exist_ok=True)
    r = recipe_from_dict({"pruning": {"enabled": True, "schedule": "oneshot", "start_epoch": 0,
                                      "round_to": 1, **pruning},
                          "trainer": {"epochs": 2}, "output": {"dir": str(tmp)}})
    params = random_params(sym)
    net = make_block(sym, params)
    data, logs = _Data(), []
    pruner, keeper = build_modifiers(r, log=logs.append)
    for m in (pruner, keeper):
        m.initialize(net, None, data)
    pruner.epoch_start(0)
    small = pruner.finalize(net, data, logs.append)
    return {k: p.data().shape for k, p in small.collect_params().items()}, pruner, logs


def test_excluded_layer_keeps_its_input_and_output_widths(tmp_path):
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=16, kernel=(3, 3), pad=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu")
    x = mx.sym.Convolution(x, num_filter=16, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn1"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    sym = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")
    cfg = {"granularity": "channel", "criterion": "l1", "final_sparsity": 0.5}
    shapes, pruner, logs = _prune_once(tmp_path / "excl", sym, {**cfg, "exclude": ["last"]})
    assert shapes["fc_weight"] == (4, 16)                 # the classifier reads all 16 channels
    assert shapes["c1_weight"] == (16, 8, 3, 3)           # c1's input group is still pruned
    assert any("not pruned" in l and "c1" in l for l in logs)
    plan = json.load(open(pruner.folder.plan_path))
    assert [g["kept_channels"] for g in plan["groups"]] == [8, 16]
    shapes, _, _ = _prune_once(tmp_path / "all", sym, {**cfg, "exclude": []})
    assert shapes["fc_weight"] == (4, 8)                  # without `exclude`, it shrinks too
    # keep_outputs (Torch-Pruning's ignored_layers): fc keeps its 4 outputs, its inputs shrink;
    # a layer named there keeps its own output width, c0 the same with the group it produces
    shapes, pruner, _ = _prune_once(tmp_path / "outs", sym, {**cfg, "exclude": [],
                                                            "keep_outputs": ["last", "c0"]})
    assert shapes["fc_weight"] == (4, 8) and shapes["c1_weight"] == (8, 16, 3, 3)
    assert shapes["c0_weight"] == (16, 3, 3, 3) and pruner.outputs_kept == ["c0", "fc"]
    # unstructured: single weights never change a width, so keep_outputs excludes the layer
    _, pruner, _ = _prune_once(tmp_path / "unstr", sym, {"granularity": "unstructured",
                                                         "final_sparsity": 0.5, "exclude": [],
                                                         "keep_outputs": ["last"]})
    assert pruner.excluded == ["fc"]


# -- masks hold under SGD with momentum and weight decay -------------------------------------------

def test_pruned_weights_stay_exactly_zero_under_momentum():
    sym = _small_graph()
    rs = np.random.RandomState(0)
    args, _, auxs = sym.infer_shape(data=(8, 3, 8, 8))
    names = sym.list_arguments() + sym.list_auxiliary_states()
    params = {n: mx.nd.array(rs.uniform(0.5, 1.5, s) if n.endswith(("gamma", "var")) else rs.normal(0, 0.3, s))
              for n, s in zip(names, list(args) + list(auxs)) if n != "data"}
    net = make_block(sym, params)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x, y = mx.nd.array(rs.normal(size=(8, 3, 8, 8))), mx.nd.array(rs.randint(0, 4, 8))

    def step():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(8)

    for _ in range(3):                       # momentum builds up before the masks arrive
        step()
    g = analyze(sym, (1, 3, 8, 8))
    removed = choose_removed(g, {u: rs.rand() for u in g.prunable_units()},
                             {grp.id: 0.5 for grp in g.groups}, round_to=1)
    masks = channel_masks(g, removed)
    masks["fc_weight"] = masks.get("fc_weight", np.ones((4, 16), bool)) & (rs.rand(4, 16) > 0.5)
    keeper = MaskKeeper()
    keeper.initialize(net, trainer, None)
    keeper.set_masks(masks)
    pd = net.collect_params()

    def pruned_values():
        return np.concatenate([pd[n].data().asnumpy()[~m] for n, m in masks.items()])

    assert pruned_values().size > 0 and (pruned_values() == 0).all()
    for k in range(5):
        step()
        keeper.after_step(0, k, 5)
        assert (pruned_values() == 0).all()
    step()                                   # without the keeper, momentum regrows them
    assert (pruned_values() != 0).any()
    # the state survives a checkpoint (pickled) into a fresh keeper
    fresh = MaskKeeper()
    fresh.load_state_dict(pickle.loads(pickle.dumps(keeper.state_dict())))
    assert set(fresh.masks) == set(masks) and all((fresh.masks[n] == masks[n]).all() for n in masks)
    fresh.initialize(net, trainer, None)
    assert (pruned_values() == 0).all()


# -- end to end ---------------------------------------------------------------------------------------

def _pruned_recipe(tmp, teacher_path, name, pruning, epochs=3):
    with open(teacher_path) as f:
        data = yaml.safe_load(f)["data"]
    r = {"name": name, "data": data, "teacher": {"recipe": os.path.basename(teacher_path)},
         "student": {"from": "teacher"},
         "distillation": [{"loss": "kd", "weight": 0.7, "temperature": 4.0}, {"loss": "ce", "weight": 0.3}],
         "pruning": {"enabled": True, **pruning},
         "trainer": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "progress": False},
         "output": {"dir": os.path.join(str(tmp), "runs", name), "latency": False}}
    path = os.path.join(str(tmp), name + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path, r["output"]["dir"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    return tmp, tiny_teacher(tmp)


def _ckpt(run, epoch):
    return read_checkpoint(os.path.join(run, "checkpoints", f"epoch-{epoch:04d}.ckpt"))


def test_channel_pruned_student_is_rebuilt_smaller_and_resumes(teacher):
    tmp, t = teacher
    path, run = _pruned_recipe(tmp, t, "chan", {"granularity": "channel", "criterion": "taylor",
                                                "schedule": "agp", "start_epoch": 0, "end_epoch": 1,
                                                "final_sparsity": 0.5, "exclude": ["last"],
                                                "shrink": "end"})    # masked while it trains
    res = run_cli(path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rebuilt smaller" in res.stdout and "shrunk ≡ masked" in res.stdout
    m = json.load(open(os.path.join(run, "metrics.json")))
    s, te = m["student"], m["teacher"]
    assert s["pruning"]["physically_smaller"] is True
    # `exclude: [last]` keeps the classifier's input too: the last stage's residual chain
    # stays whole (about 40% of the parameters), everything else loses half its channels
    assert s["params"] < 0.45 * te["params"] and s["macs"] < 0.4 * te["macs"]
    assert s["nonzero_params"] <= s["params"] and 0.5 < s["sparsity"] < 0.8
    assert s["pruning"]["shrink_vs_mask_max_diff"] <= 1e-4
    assert [h["sparsity"] > 0 for h in m["history"]] == [True, True, True]
    plan = json.load(open(os.path.join(run, "pruning-plan.json")))
    assert all(g["kept"] % 8 == 0 for g in plan["groups"] if g["kept"] < g["channels"])
    last = [g for g in plan["groups"] if any("dense" in l for l in g["layers"])]
    assert last and all(g["kept_channels"] == g["channels"] for g in last)
    assert sum(g["kept"] < g["units"] for g in plan["groups"]) == len(plan["groups"]) - len(last)
    scalars = read_scalars(os.path.join(run, "tb"))
    for tag in ("pruning/sparsity", "pruning/macs", "pruning/flops", "pruning/nonzero_params"):
        assert len(scalars[tag]) == 3, tag
    assert any(k.startswith("pruning/sparsity/") for k in scalars)
    assert scalars["pruning/macs"][-1][1] == pytest.approx(s["macs"], rel=1e-3)
    # the exported (smaller) model reloads with the reported accuracy's shapes
    from distill.data import load_data
    from distill.recipe import load_recipe
    data = load_data(load_recipe(path).data, seed=0)
    x = mx.nd.array(data.val.x[:16])
    first = load_symbol_block(os.path.join(run, "model"))(x).asnumpy()
    # masks held during training: the last checkpoint is the masked network
    ck = _ckpt(run, 2)
    masks = MaskKeeper()
    masks.load_state_dict(ck["modifiers"]["masks"])
    assert masks.masks
    for name, mk in masks.masks.items():
        vals = [v for k, v in ck["params"].items() if k.endswith(name.split("_", 1)[1])]
        assert any(v.shape == mk.shape and (v[~mk] == 0).all() for v in vals), name
    # --resume from epoch 2: the same masks and the same result as the uninterrupted run
    os.unlink(os.path.join(run, "checkpoints", "epoch-0002.ckpt"))
    res = run_cli(path, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    ck2 = _ckpt(run, 2)
    for k, v in ck["params"].items():
        np.testing.assert_allclose(ck2["params"][k], v, atol=1e-6, err_msg=k)
    for name, mk in masks.masks.items():
        vals = [v for k, v in ck2["params"].items() if k.endswith(name.split("_", 1)[1])]
        assert any(v.shape == mk.shape and (v[~mk] == 0).all() for v in vals), name
    np.testing.assert_allclose(load_symbol_block(os.path.join(run, "model"))(x).asnumpy(), first, atol=1e-5)


def test_unstructured_student_stays_masked_and_says_so(teacher):
    tmp, t = teacher
    path, run = _pruned_recipe(tmp, t, "unst", {"granularity": "unstructured", "criterion": "l1",
                                                "scope": "global", "schedule": "oneshot",
                                                "final_sparsity": 0.8}, epochs=2)
    res = run_cli(path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(os.path.join(run, "metrics.json")))
    s = m["student"]
    assert s["pruning"]["physically_smaller"] is False and "compressed" in s["pruning"]["note"]
    assert s["params"] == m["teacher"]["params"] and s["macs"] == m["teacher"]["macs"]
    assert 0.7 < s["sparsity"] < 0.8 and s["nonzero_params"] < 0.3 * s["params"]
    assert s["pruning"]["params_bytes_zlib"] < 0.6 * s["bytes"]
    # the exported weights are zero where pruned; first conv and last layer were excluded
    args = mx.nd.load(os.path.join(run, "model-0000.params"))
    weights = {k: v.asnumpy() for k, v in args.items() if k.endswith("weight") and v.ndim in (2, 4)}
    names = sorted(weights, key=lambda k: (("dense" in k), k))
    conv0 = next(k for k in names if k.endswith("conv0_weight") and "stage" not in k)
    dense = next(k for k in names if "dense" in k)
    assert (weights[conv0] != 0).all() and (weights[dense] != 0).all()
    inner = [k for k in names if k not in (conv0, dense)]
    total = sum(weights[k].size for k in inner)
    zeros = sum(int((weights[k] == 0).sum()) for k in inner)
    assert zeros / total == pytest.approx(0.8, abs=0.01)


def test_sensitivity_table_plot_and_proposal_within_budget(teacher):
    tmp, t = teacher
    path, run = _pruned_recipe(tmp, t, "sens", {"granularity": "channel", "criterion": "l1"})
    out = os.path.join(str(tmp), "sens_out")
    res = run_cli("distill", "sensitivity", path, "--ratios", "0.5", "--budget", "2.0",
                  "--repeats", "2", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.load(open(os.path.join(out, "sensitivity.json")))
    groups = {g["id"] for g in rep["groups"]}
    assert len(groups) == 12 and {r["group"] for r in rep["rows"]} == groups   # every group probed
    for r in rep["rows"]:
        assert r["kept"] % 8 == 0 and r["kept"] < r["units"] and r["macs"] < rep["base"]["macs"]
    prop = rep["proposal"]
    assert prop["drop"] <= 2.0                       # the proposal was measured within budget
    sec = yaml.safe_load(open(os.path.join(out, "proposal.yaml")))["pruning"]
    assert len(sec["overrides"]) == len(prop["ratios"])
    recipe_from_dict({"pruning": sec})               # it is a valid pruning section
    with open(os.path.join(out, "sensitivity.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(os.path.join(out, "sensitivity.csv")).readline().startswith("group,name")


def test_sensitivity_propose_is_a_knapsack():
    from distill.pruning.sensitivity import propose
    rows = [{"group": "g0", "ratio": 0.5, "drop": 0.6, "latency_ms": 8.0},
            {"group": "g0", "ratio": 0.75, "drop": 2.0, "latency_ms": 6.0},
            {"group": "g1", "ratio": 0.5, "drop": 0.5, "latency_ms": 7.0},
            {"group": "g2", "ratio": 0.5, "drop": 0.1, "latency_ms": 9.5}]
    assert propose(rows, 1.0, 10.0) == {"g1": 0.5, "g2": 0.5}      # 3.5 ms saved for 0.6 points
    assert propose(rows, 1.2, 10.0) == {"g0": 0.5, "g1": 0.5, "g2": 0.5}
    assert propose(rows, 0.0, 10.0) == {}


# -- sparse training before removal (pruning.regularize) -------------------------------------------

def _regularized(tmp, kind, targeted=False, strength=0.01):
    """The conv → BN → conv → FC net of the exclude test, a pruner with a regularize section,
    zero gradients and one before_step: the gradients are then the penalty's alone."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(1, 1), name="c1")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    sym = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")
    os.makedirs(str(tmp), exist_ok=True)
    r = recipe_from_dict({"pruning": {"enabled": True, "granularity": "channel", "criterion": "l1",
                                      "schedule": "oneshot", "start_epoch": 1, "round_to": 1,
                                      "final_sparsity": 0.5, "exclude": ["first"],
                                      "keep_outputs": ["last"],
                                      "regularize": {"kind": kind, "strength": strength,
                                                     "growth": strength, "targeted": targeted}},
                          "trainer": {"epochs": 3}, "output": {"dir": str(tmp)}})
    params = random_params(sym)
    net = make_block(sym, params)
    pruner, keeper = build_modifiers(r, log=lambda *a: None)
    for m in (pruner, keeper):
        m.initialize(net, None, _Data())
    pruner.epoch_start(0)                     # no update yet (start_epoch 1): all channels live
    for p in net.collect_params().values():
        if p.grad_req != "null":
            p.grad()[:] = 0
    pruner.before_step(0, 0)
    return {k: v.data().asnumpy() for k, v in net.collect_params().items()}, \
        {k: p.grad().asnumpy() for k, p in net.collect_params().items() if p.grad_req != "null"}, pruner


def _by_suffix(d, suffix):
    return next(v for k, v in d.items() if k.endswith(suffix))


def test_group_l2_penalty_is_lambda_w_over_the_group_norm(tmp_path):
    w, g, pruner = _regularized(tmp_path, "group_l2")
    c1, gam, fc_in = (_by_suffix(w, s) for s in ("c1_weight", "bn0_gamma", "fc_weight"))
    c0 = _by_suffix(w, "c0_weight")
    # c0's channels are excluded (first); c1's 8 channels form the group the classifier reads
    norms = np.sqrt([(c1[k] ** 2).sum() + (fc_in[:, k] ** 2).sum() for k in range(8)])
    lam = 0.01 + 0.01 * 0                      # strength + growth × epoch 0
    assert np.allclose(_by_suffix(g, "c1_weight"), lam * c1 / norms[:, None, None, None], rtol=1e-5)
    assert np.allclose(_by_suffix(g, "fc_weight"), lam * fc_in / norms[None, :], rtol=1e-5)
    assert not _by_suffix(g, "c0_weight").any() and not _by_suffix(g, "bn0_gamma").any()
    assert np.abs(c0).sum() > 0 and np.abs(gam).sum() > 0
    assert pruner.state_dict()["regularize"]["strength"] == pytest.approx(0.01)


def test_bn_l1_and_the_targeted_penalty(tmp_path):
    # bn_l1 on the only prunable BN-free group: nothing to push (c1 has no BatchNorm) ...
    _, g, _ = _regularized(tmp_path / "bn", "bn_l1")
    assert not any(v.any() for v in g.values())
    # ... targeted group_l2: only the 4 channels the one-shot update would remove (lowest l1)
    w, g, pruner = _regularized(tmp_path / "t", "group_l2", targeted=True)
    c1 = _by_suffix(w, "c1_weight")
    pushed = np.flatnonzero(np.abs(_by_suffix(g, "c1_weight")).reshape(8, -1).sum(1) > 0)
    l1 = np.abs(c1).reshape(8, -1).mean(1)
    assert sorted(pushed.tolist()) == sorted(np.argsort(l1)[:4].tolist())


def test_regularize_needs_channel_granularity():
    with pytest.raises(UserError, match="pruning.regularize"):
        recipe_from_dict({"pruning": {"enabled": True, "granularity": "unstructured",
                                      "regularize": {"kind": "bn_l1"}}, "trainer": {"epochs": 3}})
