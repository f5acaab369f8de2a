"""Prune to a target (issue 16): the allocation over sensitivity curves, the per-layer latency
model's bookkeeping, the unreachable-target message and the ``pruning.target`` recipe hook."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from distill.errors import UserError
from distill.graphio import make_block
from distill.modelinfo import layer_table
from distill.pruning.graph import analyze
from distill.pruning.latency_model import LayerLatencyModel, _one_layer, layer_specs
from distill.pruning.modifier import build_modifiers, prunable_layers
from distill.pruning.plan import choose_removed
from distill.runfolder import TARGET_FILE
from distill.pruning.target import allocate, group_levels, macs_cost, predicted_drop
from distill.recipe import recipe_from_dict

SHAPE = (1, 3, 8, 8)


def _chain():
    """Three independent conv groups (c0, c1, c2) and a classifier."""
    x = mx.sym.var("data")
    for i, n in enumerate((16, 16, 16)):
        x = mx.sym.Convolution(x, num_filter=n, kernel=(3, 3), pad=(1, 1), name=f"c{i}")
        x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name=f"bn{i}"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    return mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")


def _params(sym, seed=0):
    rs = np.random.RandomState(seed)
    args, _, auxs = sym.infer_shape(data=SHAPE)
    names = sym.list_arguments() + sym.list_auxiliary_states()
    return {n: mx.nd.array(rs.uniform(0.5, 1.5, s) if n.endswith(("gamma", "var")) else rs.normal(0, 0.3, s))
            for n, s in zip(names, list(args) + list(auxs)) if n != "data"}


@pytest.fixture(scope="module")
def chain():
    sym = _chain()
    graph = analyze(sym, SHAPE)
    scores = {int(u): float(u) for g in graph.groups for u in g.unit_ids}
    layer_macs = {r["name"]: r["macs"] for r in layer_table(sym, SHAPE)}
    weight_of = {l: w for l, w, _ in prunable_layers(sym)}
    return sym, graph, scores, layer_macs, weight_of


def _group(graph, layer):
    return next(g.id for g in graph.groups if g.name == layer)


def test_allocation_meets_a_macs_target_and_prefers_insensitive_groups(chain):
    sym, graph, scores, layer_macs, weight_of = chain
    cost = macs_cost(graph, layer_macs, weight_of, scores, round_to=2)
    g0, g1 = _group(graph, "c0"), _group(graph, "c1")
    levels = group_levels(graph, 2, [g0, g1], max_ratio=0.75)
    # c0 loses a lot per channel, c1 almost nothing: c1 goes first and deepest
    curves = {g0: [(0.25, 5.0), (0.5, 20.0), (0.75, 60.0)], g1: [(0.25, 0.1), (0.5, 0.2), (0.75, 0.5)]}
    alloc = allocate(levels, curves, cost, 0.6, "macs")
    base = cost({})
    assert cost(dict(alloc)) <= 0.6 * base * (1 + 1e-9)
    assert alloc.fraction == pytest.approx(cost(dict(alloc)) / base, rel=1e-9)
    # "exactly enough": undoing the last (smallest) step would miss the target
    assert alloc.fraction > 0.6 - 0.15
    assert alloc.get(g1, 0) > alloc.get(g0, 0)
    # swapped curves: the other way round
    swapped = allocate(levels, {g0: curves[g1], g1: curves[g0]}, cost, 0.6, "macs")
    assert swapped.get(g0, 0) > swapped.get(g1, 0)
    assert predicted_drop(curves[g0], 0.5) == pytest.approx(20.0)
    assert predicted_drop([(0.25, 3.0), (0.5, 1.0)], 0.5) == pytest.approx(3.0)   # made monotone


def test_unreachable_target_names_what_is_reachable(chain):
    sym, graph, scores, layer_macs, weight_of = chain
    cost = macs_cost(graph, layer_macs, weight_of, scores, round_to=8)
    g1 = _group(graph, "c1")
    levels = group_levels(graph, 8, [g1], max_ratio=0.75)
    assert levels == {g1: [0.5]}                     # 16 channels, multiples of 8
    floor = cost({g1: 0.5}) / cost({})
    with pytest.raises(UserError) as e:
        allocate(levels, {}, cost, 0.2, "macs", excluded=["c0", "c2"])
    msg = str(e.value)
    assert "reachable" in msg and f"{floor:.3f}" in msg and "c0, c2" in msg and "round_to" in msg
    assert e.value.reachable == pytest.approx(floor)


def test_latency_model_bookkeeping_with_injected_timings(chain):
    sym, graph, scores, _, _ = chain
    calls = []

    def timer(spec, cin, cout, batch):               # MACs-proportional, with noise on the full width
        calls.append((spec["weight"], cin, cout))
        noise = 1.3 if (cin, cout) == (spec["in"], spec["out"]) and len(calls) % 2 else 1.0
        return 1e-3 * cin * cout * noise

    model = LayerLatencyModel(graph, sym, SHAPE, batch=32, timer=timer, rounds=2)
    scale, offset = model.calibrate(measured_ms=2.0)
    assert scale == pytest.approx(2.0 / model.base_layers_ms) and offset == 0
    assert model.predict(set()) == pytest.approx(2.0)
    g1 = _group(graph, "c1")
    removed = choose_removed(graph, scores, {g1: 0.5}, round_to=8)
    widths = model.widths(removed)
    assert widths["c1"] == (16, 8) and widths["c2"] == (8, 16) and widths["c0"] == (3, 16)
    pred = model.predict(removed)
    assert pred == pytest.approx(scale * sum(model.layer_ms(l, *w) for l, w in widths.items()))
    # every width is timed in alternation with its full width; the best of both is kept, and a
    # narrower layer is never slower than the full one
    for layer, (ci, co) in widths.items():
        spec = model.specs[layer]
        assert model.layer_ms(layer, ci, co) <= model.layer_ms(layer, spec["in"], spec["out"])
    assert ("c1_weight", 16, 16) in calls and ("c1_weight", 16, 8) in calls
    assert pred < model.predict(set())
    # two measured points: an affine fit through both (a rest that does not shrink)
    a, c = model.calibrate(2.0, (removed, 1.5))
    assert model.predict(set()) == pytest.approx(2.0) and model.predict(removed) == pytest.approx(1.5)
    assert a > 0 and abs(c) < 2.0


def test_one_layer_graph_has_the_kept_widths(chain):
    sym = chain[0]
    specs = layer_specs(sym, SHAPE)
    s, shapes = _one_layer(specs["c1"], 8, 4, batch=2)
    args, outs, _ = s.infer_shape(**shapes)
    assert tuple(outs[0]) == (2, 4, 8, 8)
    assert (4, 8, 3, 3) in [tuple(a) for a in args]
    fc, shapes = _one_layer(specs["fc"], 8, 4, batch=2)
    assert tuple(fc.infer_shape(**shapes)[1][0]) == (2, 4)
    # the real profiler times it (a positive number; its size is never asserted)
    model = LayerLatencyModel(analyze(sym, SHAPE), sym, SHAPE, batch=2, repeats=2, warmup=1, rounds=1)
    assert model.layer_ms("c1", 8, 8) > 0


class _Split:
    def __init__(self, x, y):
        self.x, self.y = x, y


class _Data:
    def __init__(self, n=32, classes=4):
        rs = np.random.RandomState(0)
        self.train = _Split(rs.normal(size=(n,) + SHAPE[1:]).astype("float32"), rs.randint(0, classes, n))
        self.val = _Split(rs.normal(size=(n,) + SHAPE[1:]).astype("float32"), rs.randint(0, classes, n))

    @property
    def selection(self):          # as DataBundle's, for data without a separate test set
        return self.val


def test_recipe_target_allocates_the_ratios_and_the_schedule_reaches_them(tmp_path):
    sym = _chain()
    r = recipe_from_dict({"pruning": {"enabled": True, "schedule": "agp", "start_epoch": 0,
                                      "end_epoch": 1, "round_to": 4, "exclude": ["last"],
                                      "target": {"macs": 0.5}},
                          "trainer": {"epochs": 3}, "output": {"dir": str(tmp_path)}})
    net = make_block(sym, _params(sym))
    data, logs = _Data(), []
    pruner, keeper = build_modifiers(r, log=logs.append)
    for m in (pruner, keeper):
        m.initialize(net, None, data)
    with open(os.path.join(str(tmp_path), TARGET_FILE)) as f:
        saved = json.load(f)
    allocated = {g: r for g, r in pruner.group_ratio.items() if r > 0}
    assert allocated == saved["ratios"] and allocated
    for epoch in (0, 1):
        pruner.epoch_start(epoch)
    macs, _ = pruner.cost()
    assert macs <= 0.5 * pruner.dense_macs * (1 + 1e-6)
    assert any("target macs 0.5" in l for l in logs)
    # a resumed run reads the allocation back instead of measuring again
    again, _ = build_modifiers(r, log=logs.append)
    again.initialize(make_block(sym, _params(sym, seed=1)), None, data)
    assert {g: v for g, v in again.group_ratio.items() if v > 0} == allocated
    assert any("made at the start" in l for l in logs)


def test_recover_steps_move_a_variant_toward_the_unpruned_network(chain, tmp_path):
    from distill.pruning.probe import Probe
    sym, graph, scores, _, _ = chain
    params = _params(sym)
    # a deep cut (most of c0 and c1): enough loss for 30 Adam steps to win back
    removed = choose_removed(graph, scores, {_group(graph, "c0"): 0.875, _group(graph, "c1"): 0.875},
                             round_to=2)
    data = _Data()
    temp = 4.0                       # the recovery's KD temperature: what it minimises
    ref = mx.nd.softmax(make_block(sym, params)(mx.nd.array(data.train.x)) / temp)

    def kl(steps):
        probe = Probe(graph, params, "data", data, 2, 1, 32, str(tmp_path), recover_steps=steps,
                      symbol=sym)
        _, net, _ = probe.export(removed)
        p = mx.nd.log_softmax(net(mx.nd.array(data.train.x)) / temp)
        return float((ref * (mx.nd.log(ref + 1e-12) - p)).sum(axis=1).mean().asscalar())

    assert kl(30) < kl(0)


def test_uniform_cut_is_the_allocation_floor(chain):
    """The greedy trade is myopic; the shallowest uniform cut meeting the target, scored by the
    same predictions, is taken when it is predicted to lose less."""
    from distill.pruning.target import uniform_allocation
    sym, graph, scores, layer_macs, weight_of = chain
    cost = macs_cost(graph, layer_macs, weight_of, scores, round_to=2)
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    levels = group_levels(graph, 2, gs, max_ratio=0.75)
    uni = uniform_allocation(levels, {}, cost, 0.6)
    assert len(set(dict(uni).values())) == 1 and uni.cost <= 0.6 * cost({}) * (1 + 1e-9)
    shallower = max(r for r in levels[gs[0]] if r < uni.ratio)
    assert cost({g: shallower for g in gs}) > 0.6 * cost({})          # the shallowest that meets it
    # curves (found by a random search) on which the greedy trade ends at a predicted 0.27
    # points and every group at 0.25 at 0.22: the uniform cut is taken
    ratios = levels[gs[0]]
    drops = [[0.01, 0.04, 0.06, 0.25, 0.49, 0.53], [0.06, 0.08, 0.23, 0.31, 0.34, 0.41],
             [0.05, 0.10, 0.25, 0.25, 0.26, 0.27]]
    curves = {g: list(zip(ratios, d)) for g, d in zip(gs, drops)}
    import distill.pruning.target as target_mod
    real = target_mod.uniform_allocation
    try:
        target_mod.uniform_allocation = lambda *a, **k: None
        greedy = allocate(levels, curves, cost, 0.6, "macs")
    finally:
        target_mod.uniform_allocation = real
    alloc = allocate(levels, curves, cost, 0.6, "macs")
    uni = uniform_allocation(levels, curves, cost, 0.6)
    assert greedy.drop == pytest.approx(0.27) and uni.drop == pytest.approx(0.22)
    assert dict(alloc) == {g: 0.25 for g in gs} and alloc.drop == pytest.approx(0.22)


def test_bn_recalibration_matches_the_variant_s_own_statistics(chain, tmp_path):
    """After a cut, each BatchNorm's running statistics are re-estimated layer by layer: the
    variant in inference mode then computes what it computes on batch statistics (stale
    statistics do not)."""
    from distill.pruning.apply import shrink
    from distill.pruning.probe import recalibrate_bn
    sym, graph, scores, layer_macs, weight_of = chain
    params = _params(sym)
    removed = choose_removed(graph, scores, {_group(graph, "c0"): 0.5}, 2)
    small, p = shrink(graph, params, removed)
    x = np.random.RandomState(1).normal(size=(256,) + SHAPE[1:]).astype("float32")
    fixed = recalibrate_bn(small, p, "data", x)
    with mx.autograd.train_mode():
        ref = make_block(small, p, "data", trainable=False)(mx.nd.array(x)).asnumpy()
    new = make_block(small, fixed, "data", trainable=False)(mx.nd.array(x)).asnumpy()
    old = make_block(small, p, "data", trainable=False)(mx.nd.array(x)).asnumpy()
    scale = np.abs(ref).max()
    assert np.abs(new - ref).max() <= 1e-3 * scale
    assert np.abs(old - ref).max() > 10 * np.abs(new - ref).max()
    assert all(np.array_equal(p[k].asnumpy(), params_k.asnumpy()) for k, params_k in shrink(graph, params, removed)[1].items())


class _FakeProbe:
    """Latency ``10 ms × kept share of the prunable units``; every variant at top-1 90."""
    backend, batch_size, input_name, shape = "mxnet", 32, "data", SHAPE[1:]

    def __init__(self, graph, folder, floor=0.0, kl=None):
        self.units = sum(len(g.units) for g in graph.groups)
        self.folder, self.floor, self.n, self.ms, self.kl = folder, floor, 0, {}, kl
        self.measured = []

    def measure(self, removed, keep_files=False, time=True, fidelity=False):
        self.measured.append(set(removed))
        self.n += 1
        prefix = os.path.join(self.folder, f"v{self.n}")
        for f in (prefix + "-symbol.json", prefix + "-0000.params"):
            open(f, "w").close()
        self.ms[prefix] = 10.0 * max(1 - len(removed) / self.units, self.floor)
        return {"top1": 90.0, "macs": 1, "latency_ms": self.ms[prefix] if time else None,
                "prefix": prefix, "kl": self.kl(removed) if fidelity and self.kl else None}

    def compare(self, a, b, rounds=3):
        return self.ms[a], self.ms[b]


class _PessimisticModel:
    """Predicts the truth but never under 8 ms: its floor misses any target under 0.8×."""
    specs, base_layers_ms = {}, 10.0

    def __init__(self, units):
        self.units, self.a, self.c = units, 1.0, 0.0

    def calibrate(self, base_ms, variant=None):
        if variant is not None and len(variant[0]) >= 0.7 * self.units:
            self.c = -10.0          # refitted through the deepest cut: the floor goes
        return self.a, self.c

    def refit(self, points):
        return self.a, self.c

    def coverage(self):
        return 1.0

    def predict(self, removed):
        true = 10.0 * (1 - len(removed) / self.units)
        return true if self.c else max(true, 8.0)


def test_a_target_the_model_calls_unreachable_is_checked_by_measuring(chain, tmp_path):
    """The per-layer model's floor is a prediction: the deepest cut is timed, the model refitted
    through it, and the target met; when even the measured deepest cut misses, the error says
    what was measured."""
    from distill.pruning.probe import search_target
    sym, graph, scores, layer_macs, weight_of = chain
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    rows = [{"group": g, "ratio": r, "drop": r} for g in gs for r in (0.25, 0.5, 0.75)]
    probe = _FakeProbe(graph, str(tmp_path))
    base = probe.measure(set(), keep_files=True)
    model = _PessimisticModel(probe.units)
    res = search_target(probe, sym, graph, scores, rows, 2, "latency", 0.5, base,
                        {g.id: g.name for g in graph.groups}, max_ratio=0.75, latency_model=model,
                        log=lambda *a: None)
    assert res["calibration"]["refit"] == "deepest"
    assert abs(res["measured"] / 0.5 - 1) <= 0.1
    slow = _FakeProbe(graph, str(tmp_path), floor=0.7)
    base = slow.measure(set(), keep_files=True)
    with pytest.raises(UserError) as e:
        search_target(slow, sym, graph, scores, rows, 2, "latency", 0.5, base,
                      {g.id: g.name for g in graph.groups}, max_ratio=0.75,
                      latency_model=_PessimisticModel(slow.units), log=lambda *a: None)
    assert "Measured, the deepest cut runs at 0.700×" in str(e.value) and "≥ 0.70" in str(e.value)


def test_candidates_meet_the_target_and_differ(chain):
    """Every candidate allocation meets the target by the cost it was made with, no two are
    alike, and the greedy and uniform allocations are among them."""
    from distill.pruning.target import candidate_allocations
    sym, graph, scores, layer_macs, weight_of = chain
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    levels = group_levels(graph, 2, gs, 0.875)
    cost = macs_cost(graph, layer_macs, weight_of, scores, 2)
    curves = {g: [(0.25, 0.1 * (i + 1)), (0.5, 0.5 * (i + 1)), (0.875, 3.0 * (i + 1))]
              for i, g in enumerate(gs)}
    cands = candidate_allocations(levels, curves, cost, 0.5, n=8, seed=0, what="macs")
    kinds = [k for k, _ in cands]
    assert kinds[0] == "greedy" and "uniform" in kinds and len(cands) >= 4
    keys = [tuple(sorted(a.items())) for _, a in cands]
    assert len(set(keys)) == len(keys)
    base = cost({})
    for _, a in cands:
        assert cost(dict(a)) <= 0.5 * base * (1 + 1e-9)
        assert a.drop == pytest.approx(sum(predicted_drop(curves[g], r) for g, r in a.items()))


def test_the_search_takes_the_candidate_closest_to_the_unpruned_network(chain, tmp_path):
    """The curves call c0 free, but cutting it hurts the combined network: the candidate the
    search takes is the one that measures closest to the unpruned network (KL), not the one
    the curves predict best; every candidate is measured and reported."""
    from distill.pruning.probe import search_target
    sym, graph, scores, layer_macs, weight_of = chain
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    c0_units = set(int(u) for u in next(g for g in graph.groups if g.id == gs[0]).units)
    rows = [{"group": g, "ratio": r, "drop": (0.01 if g == gs[0] else 1.0) * r}
            for g in gs for r in (0.25, 0.5, 0.75)]

    def kl(removed):        # the truth: every c0 unit removed costs 10× any other
        return 0.01 * (10 * len(removed & c0_units) + len(removed - c0_units))
    probe = _FakeProbe(graph, str(tmp_path), kl=kl)
    base = probe.measure(set(), keep_files=True)
    names = {g.id: g.name for g in graph.groups}
    model = _ExactModel(probe.units)
    res = search_target(probe, sym, graph, scores, rows, 2, "latency", 0.6, base, names,
                        max_ratio=0.75, log=lambda *a: None, candidates=8, latency_model=model)
    greedy = search_target(probe, sym, graph, scores, rows, 2, "latency", 0.6, base, names,
                           max_ratio=0.75, log=lambda *a: None, candidates=1, latency_model=model)
    assert len(res["candidates"]) >= 4 and all(c["kl"] is not None for c in res["candidates"])
    inside = [c for c in res["candidates"] if 0.54 <= c["measured"] <= 0.63]
    assert res["kl"] == min(c["kl"] for c in inside)
    # the greedy allocation trusts the curves and cuts c0 deepest; the measured choice cuts it less
    assert greedy["ratios"].get(gs[0], 0) > res["ratios"].get(gs[0], 0)
    assert res["kl"] < kl(choose_removed(graph, scores, greedy["ratios"], 2))
    assert abs(res["measured"] / 0.6 - 1) <= 0.1 and res["model_errors"]["n"] == len(res["candidates"])


class _ExactModel(_PessimisticModel):
    """Predicts the fake probe's latency exactly."""
    def predict(self, removed):
        return 10.0 * (1 - len(removed) / self.units)


@pytest.mark.parametrize("which", ["chain", "mobileface", "resnext", "shufflenet"])
def test_removal_cache_is_choose_removed(chain, which):
    """The search's per-group removal cache gives exactly choose_removed's units, on graphs
    whose groups share no tensor and on one where they do (ShuffleNet's tied units)."""
    import graphs
    from distill.pruning.plan import removal_cache
    if which == "chain":
        graph, scores = chain[1], chain[2]
    else:
        if which == "shufflenet":
            from gluoncv.model_zoo import get_model
            net = get_model("shufflenet_v1", classes=4)
            net.initialize()
            net.hybridize()
            net(mx.nd.zeros((1, 3, 32, 32)))
            sym, shape = net(mx.sym.var("data")), (1, 3, 32, 32)
        else:
            spec = getattr(graphs, which)()
            sym, shape = spec.symbol, (1,) + tuple(spec.input_shape)
        graph = analyze(sym, shape)
        scores = {int(u): float((u * 7919) % 101) for g in graph.groups for u in g.unit_ids}
    rng = np.random.RandomState(0)
    removed = removal_cache(graph, scores, 2)
    for _ in range(20):
        ratios = {g.id: float(rng.choice([0.0, 0.25, 0.5, 0.75])) for g in graph.groups}
        assert removed(ratios) == frozenset(choose_removed(graph, scores, ratios, 2))


@pytest.mark.parametrize("which", ["chain", "mobileface", "resnext", "convfc", "innorm"])
def test_ncnn_one_layer_nets_compute_the_kept_widths(chain, tmp_path, which):
    """--backend ncnn's latency model times each layer alone in ncnn's runtime: every one-layer
    net (conv, depthwise with PReLU, 32-group conv, FC on a 4-D map) loads in ncnn and puts out
    what MXNet's one-layer graph of the same widths does, pruned and unpruned; one child
    process times them all."""
    import graphs
    from distill.pruning.latency_model import NcnnLayerTimer
    if which == "chain":
        sym, shape = chain[0], SHAPE
    else:
        spec = getattr(graphs, which)()
        sym, shape = spec.symbol, (1,) + tuple(spec.input_shape)
    graph = analyze(sym, shape)
    scores = {int(u): float((u * 7919) % 101) for g in graph.groups for u in g.unit_ids}
    model = LayerLatencyModel(graph, sym, shape, batch=1, timer=NcnnLayerTimer(str(tmp_path), repeats=1),
                              rounds=1)
    half = choose_removed(graph, scores, {g.id: 0.5 for g in graph.groups}, 2)
    items = [(model.specs[l], ci, co) for r in (set(), half) for l, (ci, co) in model.widths(r).items()]
    ms = model.timer.many(items, rounds=1)
    assert model.timer.calls == 1 and len(ms) == len(items)
    assert all(np.isfinite(t) and t >= 0 for t in ms)
    for (spec, ci, co), got in zip(items, model.timer.shapes):
        s, shapes = _one_layer(spec, ci, co, batch=1)
        want = tuple(s.infer_shape(**shapes)[1][0])[1:]
        assert int(np.prod(got)) == int(np.prod(want)) and got[0] == want[0], (spec["weight"], ci, co, got, want)
    # prefetch: every width of every level in one call; predictions then time nothing more
    levels = group_levels(graph, 2, [g.id for g in graph.groups], max_ratio=0.75)
    n = model.prefetch(choose_removed(graph, scores, {g: r}, 2) for g, lv in levels.items() for r in lv)
    assert n > len(model.specs) and model.timer.calls == 2
    model.calibrate(1.0)
    for r in (0.25, 0.5, 0.75):
        model.predict(choose_removed(graph, scores, {g: r for g in levels}, 2))
    assert model.timer.calls == 2


def test_ncnn_timer_failure_is_a_user_error(chain, tmp_path, monkeypatch):
    """A one-layer net ncnn cannot load fails in the child process and comes back as a clear
    error naming the backend, not as a dead search."""
    import distill.pruning.latency_model as lm
    monkeypatch.setattr(lm, "ncnn_layer_param", lambda spec, cin, cout: ("7767517\n1 1\nNoSuchLayer x 0 1 out\n", (4, 8, 8)))
    spec = layer_specs(chain[0], SHAPE)["c1"]
    with pytest.raises(UserError, match="--backend ncnn.*ncnn's runtime failed timing 1 one-layer nets"):
        lm.NcnnLayerTimer(str(tmp_path), repeats=1).many([(spec, 16, 8)])


def test_ncnn_target_search_end_to_end(tmp_path):
    """``--backend ncnn`` from the curves to a measured proposal on a real Probe: the variants
    exported to ncnn and timed in its runtime, the latency model's layers timed in ncnn (not
    MXNet), every candidate reported with its model error (figures are printed, not asserted:
    wall-clock times)."""
    from distill.pruning.probe import Probe, search_target
    shape = (1, 3, 16, 16)
    x = mx.sym.var("data")
    for i in range(3):
        x = mx.sym.Convolution(x, num_filter=32, kernel=(3, 3), pad=(1, 1), name=f"c{i}")
        x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name=f"bn{i}"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    sym = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")
    rs = np.random.RandomState(0)
    args, _, auxs = sym.infer_shape(data=shape)
    params = {n: mx.nd.array(rs.uniform(0.5, 1.5, s) if n.endswith(("gamma", "var")) else rs.normal(0, 0.3, s))
              for n, s in zip(sym.list_arguments() + sym.list_auxiliary_states(), list(args) + list(auxs))
              if n != "data"}
    graph = analyze(sym, shape)
    scores = {int(u): float(u) for g in graph.groups for u in g.unit_ids}
    data = _Data()
    data.num_classes, data.mean, data.std, data.class_names = 4, [0.5], [0.25], None    # the ONNX file's metadata
    data.train.x = rs.normal(size=(32,) + shape[1:]).astype("float32")
    data.val.x = rs.normal(size=(32,) + shape[1:]).astype("float32")
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    rows = [{"group": g, "ratio": r, "drop": r * (i + 1)} for i, g in enumerate(gs) for r in (0.25, 0.5, 0.75)]
    probe = Probe(graph, params, "data", data, 1, 3, 32, str(tmp_path), backend="ncnn", symbol=sym)
    base = probe.measure(set(), keep_files=True)
    logs = []
    res = search_target(probe, sym, graph, scores, rows, 8, "latency", 0.6, base,
                        {g.id: g.name for g in graph.groups}, max_ratio=0.75, model_repeats=3,
                        log=logs.append, candidates=2)
    print("\n".join(logs))
    assert any("layer widths timed alone in ncnn's runtime" in l for l in logs)
    assert any("timed alone (ncnn, one thread, batch 1)" in l for l in logs)
    assert res["candidates"] and res["model_errors"]["n"] >= len(res["candidates"])
    for c in res["candidates"]:
        assert c["measured_ms"] > 0 and c["base_ms"] > 0 and "model_error" in c
        assert c["measured"] == pytest.approx(c["measured_ms"] / c["base_ms"], rel=1e-3)
    assert os.path.isfile(res["prefix"] + ".ncnn.param")


class _BiasedModel(_PessimisticModel):
    """Thinks cutting c1/c2 saves 1.3× what it does, until it is refitted through measurements."""
    def __init__(self, units, cheap):
        super().__init__(units)
        self.cheap, self.refits = cheap, 0

    def refit(self, points):
        self.refits += 1
        return self.a, self.c

    def predict(self, removed):
        bias = 0.0 if self.refits else 0.3 * len(removed & self.cheap)
        return 10.0 * (1 - (len(removed) + bias) / self.units)


def test_a_better_candidate_over_the_target_gets_a_second_set(chain, tmp_path):
    """When a candidate closer to the unpruned network misses the band on the slow side (the
    model is biased there), the model is refitted and a second set measured; the result is the
    closest to the unpruned network of everything measured inside the band."""
    from distill.pruning.probe import search_target
    sym, graph, scores, layer_macs, weight_of = chain
    gs = [_group(graph, c) for c in ("c0", "c1", "c2")]
    c0_units = set(int(u) for u in next(g for g in graph.groups if g.id == gs[0]).units)
    # the curves say what is true: c0 costs 10× the others
    rows = [{"group": g, "ratio": r, "drop": (10.0 if g == gs[0] else 1.0) * r} for g in gs for r in (0.25, 0.5, 0.75)]

    def kl(removed):
        return 0.01 * (10 * len(removed & c0_units) + len(removed - c0_units))
    probe = _FakeProbe(graph, str(tmp_path), kl=kl)
    base = probe.measure(set(), keep_files=True)
    cheap = {int(u) for g in graph.groups if g.id != gs[0] for u in g.units}
    model = _BiasedModel(probe.units, cheap)
    logs = []
    res = search_target(probe, sym, graph, scores, rows, 2, "latency", 0.6, base,
                        {g.id: g.name for g in graph.groups}, max_ratio=0.75, log=logs.append,
                        candidates=8, latency_model=model)
    first = [c for c in res["candidates"] if c["attempts"] == 1]
    second = [c for c in res["candidates"] if c["attempts"] == 2]
    hi = 0.6 * 1.05
    assert any(c["measured"] > hi for c in first), first
    assert model.refits == 1 and second and any("measuring a second set" in l for l in logs)
    inside = [c for c in res["candidates"] if 0.54 <= c["measured"] <= hi + 1e-9]
    assert res["kl"] == min(c["kl"] for c in inside)
    assert res["attempts"] == 2 and res["kl"] < min(c["kl"] for c in first if 0.54 <= c["measured"] <= hi + 1e-9)
    assert len({tuple(sorted(c["ratios"].items())) for c in res["candidates"]}) == len(res["candidates"])
