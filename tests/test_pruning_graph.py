"""Channel pruning on symbol graphs: analyse → plan → apply.

For zoo students, a Module-API graph and randomly generated graphs: the shrunk network computes
what the masked network computes (max abs diff ≤ 1e-4), is smaller, and exports and reloads.
"""
import functools
import json
import os

import mxnet as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from distill.errors import UserError
from distill.graphio import load_pair, load_symbol_block, make_block
from distill.modelinfo import total_macs
from distill.pruning.apply import mask_params, shrink, shrunk_block
from distill.pruning.graph import analyze
from distill.pruning.plan import Plan, choose_removed, plan_from_removed, removed_units, round_keep

TOL = 1e-4


def _random_params(sym, input_shape, seed=0, input_name="data"):
    """Random weights and non-trivial BatchNorm statistics for ``sym``."""
    rs = np.random.RandomState(seed)
    args, _, auxs = sym.infer_shape(**{input_name: input_shape})
    names = sym.list_arguments() + sym.list_auxiliary_states()
    params = {}
    for n, s in zip(names, list(args) + list(auxs)):
        if n == input_name:
            continue
        if n.endswith(("gamma", "var")):
            v = rs.uniform(0.5, 1.5, size=s)
        elif n.endswith(("beta", "mean", "bias")):
            v = rs.normal(0, 0.1, size=s)
        else:
            fan_in = max(1, int(np.prod(s[1:])))
            v = rs.normal(0, 1.0 / np.sqrt(fan_in), size=s)
        params[n] = mx.nd.array(v)
    return params


def _check_shrink_equals_mask(sym, params, input_shape, ratio=0.5, round_to=1, seed=0,
                              input_name="data"):
    g = analyze(sym, input_shape, input_name)
    rs = np.random.RandomState(seed)
    scores = {u: rs.rand() for u in g.prunable_units()}
    removed = choose_removed(g, scores, {grp.id: ratio for grp in g.groups}, round_to=round_to)
    small_sym, small_params = shrink(g, params, removed)
    x = mx.nd.array(rs.normal(size=(3,) + tuple(input_shape[1:])))
    masked = make_block(sym, mask_params(g, params, removed), input_name)(x).asnumpy()
    small = make_block(small_sym, small_params, input_name)(x).asnumpy()
    assert small.shape == masked.shape
    assert np.abs(small - masked).max() <= TOL * max(1.0, np.abs(masked).max())
    return g, removed, small_sym, small_params, x, small


@functools.lru_cache(maxsize=None)
def _zoo_symbol(name, size=16):
    """Build a zoo student, export it (symbol JSON + params), load the pair back; BatchNorm
    statistics are randomized so that shrink ≡ mask is not trivially met by zeros."""
    import tempfile
    from students import build_student
    net = build_student(name, 3, 10, (size, size), seed=0)
    net.hybridize()
    net(mx.nd.zeros((1, 3, size, size)))
    with tempfile.TemporaryDirectory() as tmp:
        net.export(os.path.join(tmp, "net"), epoch=0)
        sym, params = load_pair(os.path.join(tmp, "net"), 0)
    rand = _random_params(sym, (1, 3, size, size))
    for k in params:
        if k.endswith(("gamma", "beta", "mean", "var")):
            params[k] = rand[k]
    return sym, params


@pytest.mark.parametrize("name,n_groups", [("cifar_resnet20_v1", 12), ("mobilenetv2_0.5", 25),
                                           ("shufflenet_v2", 21)])
def test_zoo_students_shrink_equals_mask_and_reload(tmp_path, name, n_groups):
    sym, params = _zoo_symbol(name)
    g, removed, ssym, sparams, x, small = _check_shrink_equals_mask(sym, params, (1, 3, 16, 16),
                                                                    round_to=8)
    assert len(g.groups) == n_groups and removed
    assert total_macs(ssym, (1, 3, 16, 16)) < 0.5 * total_macs(sym, (1, 3, 16, 16))
    # round_to: every pruned group keeps a multiple of 8 anchor channels
    kept = {gid: len(k) for gid, k in plan_from_removed(g, removed).keep.items()}
    assert kept and all(k % 8 == 0 for k in kept.values()), kept
    # the smaller network exports and reloads with the same output
    net = shrunk_block(ssym, sparams)
    net(x)
    net.export(str(tmp_path / "small"), epoch=0)
    again = load_symbol_block(str(tmp_path / "small"))(x).asnumpy()
    np.testing.assert_allclose(again, small, atol=1e-5)


def test_resnet_groups_follow_residual_stages():
    sym, _ = _zoo_symbol("cifar_resnet20_v1")
    g = analyze(sym, (1, 3, 16, 16))
    chains = [grp for grp in g.groups if len(grp.producers) > 2]
    # one group per stage: the stem/downsample conv and every block's last conv feed one sum
    assert [len(c.producers) for c in chains] == [4, 4, 4]
    assert [c.channels for c in chains] == [16, 32, 64]
    assert len(g.intact) == 1 and g.intact[0]["layer"].endswith("dense0_fwd")
    assert g.intact[0]["reason"] == "the network output"


def _module_graph():
    """A Module-API style graph: grouped conv, concat and a residual add, with a training head."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=16, kernel=(3, 3), pad=(1, 1), name="stem")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="stem_bn")
    x = mx.sym.Activation(x, act_type="relu", name="stem_relu")
    a = mx.sym.Convolution(x, num_filter=8, kernel=(1, 1), name="branch_a")
    b = mx.sym.Convolution(x, num_filter=16, kernel=(3, 3), pad=(1, 1), num_group=4, name="gconv")
    b = mx.sym.BatchNorm(b, name="gconv_bn")
    b = mx.sym.Activation(b, act_type="relu", name="gconv_relu")
    b = mx.sym.Convolution(b, num_filter=8, kernel=(1, 1), no_bias=True, name="branch_b")
    y = mx.sym.Concat(a, b, dim=1, name="cat")
    y = y + x                                        # residual add over the concat
    y = mx.sym.Activation(y, act_type="relu", name="out_relu")
    y = mx.sym.Pooling(y, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")
    y = mx.sym.Flatten(y, name="flat")
    y = mx.sym.FullyConnected(y, num_hidden=5, name="fc")
    return mx.sym.SoftmaxOutput(y, name="softmax")


def test_module_api_graph_with_concat_grouped_conv_and_residual(tmp_path):
    full = _module_graph()
    params = _random_params(full, (1, 3, 8, 8))
    arg = {k: v for k, v in params.items() if k in full.list_arguments()}
    aux = {k: v for k, v in params.items() if k in full.list_auxiliary_states()}
    prefix = str(tmp_path / "modnet")
    mx.model.save_checkpoint(prefix, 0, full, {k: v for k, v in arg.items() if k != "softmax_label"}, aux)
    sym, loaded = load_pair(prefix, 0)           # head stripped, arg:/aux: merged
    g, removed, ssym, sparams, x, small = _check_shrink_equals_mask(sym, loaded, (1, 3, 8, 8))
    nodes = {n["name"]: n for n in json.loads(ssym.tojson())["nodes"]}
    # grouped conv: still 4 groups, input and output divisible by them
    assert nodes["gconv"]["attrs"]["num_group"] == "4"
    assert sparams["gconv_weight"].shape[0] % 4 == 0
    # the concat + residual couple stem, branch_a and branch_b; Flatten→FC follows the channels
    chain = next(grp for grp in g.groups if "stem" in grp.producers)
    assert {"stem", "branch_a", "branch_b"} <= set(chain.producers)
    assert sparams["fc_weight"].shape[1] == sparams["stem_weight"].shape[0] * 16
    assert sparams["stem_weight"].shape[0] < 16
    net = shrunk_block(ssym, sparams)
    net(x)
    net.export(str(tmp_path / "small"), epoch=0)
    np.testing.assert_allclose(load_symbol_block(str(tmp_path / "small"))(x).asnumpy(), small, atol=1e-5)
    # a Module binds the shrunk pair too
    mod = mx.mod.Module(ssym, data_names=["data"], label_names=None)
    mod.bind(data_shapes=[("data", x.shape)], for_training=False)
    mod.set_params({k: v for k, v in sparams.items() if k in ssym.list_arguments()},
                   {k: v for k, v in sparams.items() if k in ssym.list_auxiliary_states()})
    mod.forward(mx.io.DataBatch([x]), is_train=False)
    np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), small, atol=1e-5)


def test_unsafe_ops_are_left_intact_and_listed():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.LRN(x, nsize=3, name="lrn")                      # mixes neighbouring channels
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="c2")
    s = mx.sym.softmax(x, axis=1, name="chan_softmax")           # normalises across channels
    x = mx.sym.Convolution(s, num_filter=8, kernel=(1, 1), name="c3")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(1, 1), name="c4")
    x = mx.sym.FullyConnected(mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg"),
                              num_hidden=3, name="fc")
    params = _random_params(x, (1, 3, 8, 8))
    g, removed, *_ = _check_shrink_equals_mask(x, params, (1, 3, 8, 8))
    unsafe = {u["layer"]: u["reason"] for u in g.unsafe}
    assert "neighbouring channels" in unsafe["lrn"] and "across channels" in unsafe["chan_softmax"]
    intact = {i["layer"]: i["reason"] for i in g.intact}
    assert "lrn" in intact["c1"] and "chan_softmax" in intact["c2"]
    assert [grp.name for grp in g.groups] == ["c3", "c4"]      # only these can shrink
    assert removed


def test_plan_round_trips_through_json(tmp_path):
    sym, params = _zoo_symbol("cifar_resnet20_v1")
    g = analyze(sym, (1, 3, 16, 16))
    scores = {u: float(u % 7) for u in g.prunable_units()}
    removed = choose_removed(g, scores, {grp.id: 0.5 for grp in g.groups}, round_to=8)
    path = str(tmp_path / "plan.json")
    plan_from_removed(g, removed).save(path, g)
    d = json.load(open(path))
    assert {grp["id"] for grp in d["groups"]} == {grp.id for grp in g.groups}
    assert d["intact"][0]["reason"] == "the network output"
    assert removed_units(g, Plan.load(path)) == removed
    with pytest.raises(UserError) as e:
        removed_units(g, Plan({"g99": [0]}))
    assert "g99" in str(e.value)
    with pytest.raises(UserError):
        removed_units(g, Plan({"g0": []}))


def test_plan_says_kept_counts_units_and_gives_channels():
    """32 groups of 2 channels: a unit is a block of 2 channels, `kept` counts units."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=64, kernel=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu")
    x = mx.sym.Convolution(x, num_filter=64, kernel=(3, 3), pad=(1, 1), num_group=32, name="gconv")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn1"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")
    g = analyze(x, (1, 3, 8, 8))
    removed = choose_removed(g, {u: float(u % 5) for u in g.prunable_units()},
                             {grp.id: 0.5 for grp in g.groups}, round_to=1)
    d = plan_from_removed(g, removed).to_dict(g)
    assert "units" in d["counts"] and "kept_channels" in d["counts"]
    tied = [grp for grp in d["groups"] if grp["units"] < grp["channels"]]
    assert tied
    for grp in d["groups"]:
        mult = grp["channels"] // grp["units"]
        assert grp["kept_channels"] == grp["kept"] * mult
        assert grp["kept"] == len(grp["keep"])
    assert any(grp["kept_channels"] != grp["kept"] for grp in tied)
    assert "counts" not in Plan.from_dict(d).meta          # not carried into a re-saved plan


def test_shrink_mismatch_names_the_first_layer_that_differs():
    from distill.pruning.apply import first_divergence
    from distill.pruning.graph import PruningGraphError
    assert issubclass(PruningGraphError, UserError)        # printed as one paragraph by the CLI
    sym, params = _zoo_symbol("cifar_resnet20_v1")
    g, removed, ssym, sparams, x, small = _check_shrink_equals_mask(sym, params, (1, 3, 16, 16))
    masked = mask_params(g, params, removed)
    assert first_divergence(g, sym, masked, ssym, sparams, x, removed) is None
    layer = [grp for grp in g.groups if len(grp.producers) == 1][2].producers[0]
    weight = next(sl.param for sl in g.slices if sl.layer == layer and sl.role == "out")
    broken = dict(sparams)
    broken[weight] = sparams[weight] * 1.5
    name, diff, scale = first_divergence(g, sym, masked, ssym, broken, x, removed)
    assert name == layer and diff > 1e-4 * scale


def test_round_to_and_global_scope():
    assert round_keep(16, 11, 1, 8) == 16          # 11 → 16: no pruning rather than odd counts
    assert round_keep(64, 32, 1, 8) == 32
    assert round_keep(64, 30, 1, 8) == 32
    assert round_keep(58, 29, 1, 8) == 32
    assert round_keep(64, 3, 1, 8) == 8            # at least round_to channels stay
    assert round_keep(48, 10, 2, 8) == 12          # units tied in pairs: 12 units = 24 channels
    sym, params = _zoo_symbol("cifar_resnet20_v1")
    g = analyze(sym, (1, 3, 16, 16))
    # global scope: the lowest scores anywhere go first; give stage 3 the lowest scores
    s3 = {u for grp in g.groups if grp.channels == 64 for u in grp.units.tolist()}
    scores = {u: (0.0 if u in s3 else 1.0) + 1e-6 * (u % 13) for u in g.prunable_units()}
    removed = choose_removed(g, scores, {grp.id: 0.3 for grp in g.groups}, round_to=8, scope="global")
    assert removed and removed <= s3


# -- property test: random small graphs ---------------------------------------------------------

@st.composite
def random_graphs(draw):
    """A random small graph over 8×8 inputs from residual, concat, grouped/depthwise conv,
    shuffle, split, slice, SE gate, per-channel scale, LRN (unsafe) and Flatten→FC pieces."""
    data = mx.sym.var("data")
    n = [0]

    def name(p):
        n[0] += 1
        return f"{p}{n[0]}"

    c = draw(st.sampled_from([4, 6, 8]))
    x = mx.sym.Convolution(data, num_filter=c, kernel=(3, 3), pad=(1, 1), name=name("conv"))
    tensors = [(x, c)]
    for _ in range(draw(st.integers(1, 6))):
        x, c = tensors[-1]
        op = draw(st.sampled_from(["conv", "gconv", "dw", "bnrelu", "add", "concat", "shuffle",
                                   "split", "slice", "pool", "scale", "se", "lrn"]))
        if op == "conv":
            co, k = draw(st.sampled_from([4, 6, 8])), draw(st.sampled_from([1, 3]))
            y, c = mx.sym.Convolution(x, num_filter=co, kernel=(k, k), pad=(k // 2, k // 2),
                                      no_bias=draw(st.booleans()), name=name("conv")), co
        elif op == "gconv" and c % 2 == 0:
            co = 2 * draw(st.sampled_from([2, 3, 4]))
            y, c = mx.sym.Convolution(x, num_filter=co, kernel=(3, 3), pad=(1, 1), num_group=2,
                                      name=name("gconv")), co
        elif op == "dw":
            m = draw(st.sampled_from([1, 2]))
            y, c = mx.sym.Convolution(x, num_filter=c * m, kernel=(3, 3), pad=(1, 1), num_group=c,
                                      name=name("dw")), c * m
        elif op == "bnrelu":
            y = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name=name("bn")), act_type="relu")
        elif op == "add":
            y = x + mx.sym.Convolution(x, num_filter=c, kernel=(1, 1), name=name("res"))
        elif op == "concat":
            other, c2 = tensors[draw(st.integers(0, len(tensors) - 1))]
            y, c = mx.sym.Concat(x, other, dim=1, name=name("cat")), c + c2
        elif op == "shuffle" and c % 2 == 0:
            y = mx.sym.reshape(x, shape=(0, -4, 2, -1, -2))
            y = mx.sym.reshape(mx.sym.swapaxes(y, 1, 2), shape=(0, -3, -2))
        elif op == "split" and c % 2 == 0:
            parts = mx.sym.split(x, num_outputs=2, axis=1, name=name("split"))
            y = mx.sym.Concat(parts[1], parts[0], dim=1)
        elif op == "slice" and c >= 4:
            b = draw(st.integers(0, c // 2))
            y, c = mx.sym.slice_axis(x, axis=1, begin=b, end=c, name=name("slice")), c - b
        elif op == "pool":
            y = mx.sym.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="avg")
        elif op == "scale":
            y = mx.sym.broadcast_mul(x, mx.sym.var(name("scale"), shape=(1, c, 1, 1)))
        elif op == "se":
            gate = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
            gate = mx.sym.sigmoid(mx.sym.Convolution(gate, num_filter=c, kernel=(1, 1), name=name("se")))
            y = mx.sym.broadcast_mul(x, gate)
        elif op == "lrn":
            y = mx.sym.LRN(x, nsize=3, name=name("lrn"))
        else:
            y = mx.sym.Activation(x, act_type="relu")
        tensors.append((y, c))
    x = mx.sym.Pooling(tensors[-1][0], kernel=(4, 4), stride=(4, 4), pool_type="avg")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=6, name=name("fc"))
    x = mx.sym.FullyConnected(mx.sym.Activation(x, act_type="relu"), num_hidden=3, name=name("fc"))
    return x, draw(st.floats(0.1, 0.9)), draw(st.integers(0, 1000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_random_graphs_shrink_equals_mask(case):
    sym, ratio, seed = case
    params = _random_params(sym, (1, 3, 8, 8), seed)
    g, removed, ssym, sparams, x, small = _check_shrink_equals_mask(sym, params, (1, 3, 8, 8),
                                                                    ratio=ratio, seed=seed)
    assert small.shape == (3, 3) and np.isfinite(small).all()
    # the shrunk graph is a plain MXNet graph: JSON round trip, shapes infer, it runs
    again = mx.sym.load_json(ssym.tojson())
    assert again.infer_shape(data=(5, 3, 8, 8))[1][0] == (5, 3)
    if removed:
        assert sum(v.size for v in sparams.values()) < sum(v.size for v in params.values())
