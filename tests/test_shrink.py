"""Channel pruning that rebuilds the student smaller at every update (``pruning.shrink:
each_update``): the rebuilt network computes what the masked one did, training goes on with it,
the optimizer state follows (``optimizer_state: slice``), hint adapters follow, and ``--resume``
after a kill mid-schedule rebuilds the same shapes."""
import json
import os
import re

import mxnet as mx
import numpy as np
import pytest

from distill.checkpoint import optimizer_state, read_checkpoint
from distill.data import load_data
from distill.errors import UserError
from distill.graphio import make_block
from distill.losses import build_loss
from distill.modifier import Modifier
from distill.pruning.apply import (cut_array, expand_array, mask_params, param_keeps,
                                   relative_keeps)
from distill.pruning.modifier import build_modifiers
from distill.recipe import DataConfig, LossTerm, recipe_from_dict
from distill.trainer import Term, fit
from helpers import kill_when, random_params, run_cli, tiny_student, tiny_teacher


def _graph():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=16, kernel=(3, 3), pad=(1, 1), name="c0")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn0"), act_type="relu")
    y = mx.sym.Convolution(x, num_filter=16, kernel=(3, 3), pad=(1, 1), name="c1")
    y = mx.sym.BatchNorm(y, fix_gamma=False, name="bn1")
    x = mx.sym.Activation(x + y, act_type="relu", name="res")
    x = mx.sym.Convolution(x, num_filter=16, kernel=(1, 1), name="c2")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn2"), act_type="relu")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg")
    return mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc")


class _Watch(Modifier):
    """Before each pruning update: the optimizer state by parameter name. After each swap: the
    rebuilt student's logits against the masked dense network of the same weights, and the
    new trainer's state against the old one cut to the kept channels."""
    name = "watch"

    def __init__(self, pruner, x):
        self.pruner, self.x, self.checks, self.momentum_checked = pruner, x, [], 0
        self.resets = 0

    def initialize(self, net, trainer, data):
        self.trainer = trainer

    def epoch_start(self, epoch):           # runs before the pruner's update (list order)
        self.before = _states(self.trainer)
        self.cut_before = param_keeps(self.pruner.graph, self.pruner.cut)

    def rebind(self, net, trainer):
        pr = self.pruner
        self.trainer = trainer
        g = pr.graph
        dense = pr._np_params(sorted(g.param_shapes))
        masked = make_block(pr.symbol, mask_params(g, dense, pr.removed), pr.input_name, trainable=False)
        ref = masked(self.x).asnumpy()
        got = net(self.x).asnumpy()
        self.checks.append((np.abs(ref - got).max(), max(1.0, np.abs(ref).max()),
                            tuple(net.collect_params()["c0_weight"].shape)))
        rel = relative_keeps(self.cut_before, param_keeps(g, pr.removed))
        after = _states(trainer)
        if pr.cfg.optimizer_state == "reset":
            assert after == {}                  # a fresh optimizer: no momentum yet
            self.resets += 1
            return
        for name, old in self.before.items():
            assert name in after, name
            want = cut_array(old, rel.get(name, []))
            assert np.array_equal(after[name], want), name       # exactly the kept momentum
            self.momentum_checked += 1


def _states(trainer):
    st = optimizer_state(trainer)
    return {trainer._params[i].name: s.asnumpy() for i, s in st["states"][0].items() if s is not None}


def _run(tmp, shrink, epochs=4, extra=None):
    os.makedirs(str(tmp), exist_ok=True)
    data = load_data(DataConfig(name="synthetic", num_samples=320, num_classes=4, image_size=8), seed=0)
    sym = _graph()
    net = make_block(sym, random_params(sym, (2, 1, 8, 8), seed=1))
    net.hybridize(static_alloc=True, static_shape=True)
    r = recipe_from_dict({"pruning": {"enabled": True, "granularity": "channel", "schedule": "agp",
                                      "start_epoch": 0, "end_epoch": 2, "final_sparsity": 0.75,
                                      "round_to": 1, "exclude": [], "keep_outputs": ["last"],
                                      "shrink": shrink, **(extra or {})},
                          "trainer": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "seed": 0,
                                      "optimizer": "nesterov", "progress": False},
                          "output": {"dir": str(tmp)}})
    pruner, keeper = build_modifiers(r, log=lambda *_: None)
    watch = _Watch(pruner, mx.nd.array(data.val.x[:16]))
    block = build_loss(LossTerm(loss="ce", weight=1.0))
    block.initialize(ctx=mx.cpu())
    out = fit(net, net, None, data, [Term("ce", 1.0, block)], r.trainer, log=lambda *_: None,
              modifiers=[watch, pruner, keeper])
    return out, pruner, watch, data


def test_each_update_rebuilds_equal_to_masked_and_slices_momentum_exactly(tmp_path):
    out, pruner, watch, data = _run(tmp_path / "each", "each_update")
    # an update that removes channels is a swap; each rebuilt student computes the masked
    # network's logits
    assert len(pruner.done) == 3 and len(watch.checks) == len(pruner.rebuild_log) >= 2
    for diff, scale, _ in watch.checks:
        assert diff <= 1e-4 * scale
    widths = [c[2][0] for c in watch.checks]
    assert widths[0] > widths[-1] and widths == sorted(widths, reverse=True)
    # the first update comes before any step (no state yet); at each later swap every one of
    # the 14 learnable parameters had momentum, carried over exactly
    assert watch.momentum_checked == 14 * (len(watch.checks) - 1)
    small = out["student"]
    assert small.collect_params()["c0_weight"].shape[0] == widths[-1] == 4
    assert small.collect_params()["fc_weight"].shape == (4, 4)      # keep_outputs: [last]
    # the masked run (shrink: end) chooses the same channels from the same weights and ends
    # at the same function, up to float rounding (sums of fewer terms in another order)
    out_m, pruner_m, _, _ = _run(tmp_path / "end", "end")
    assert pruner_m.removed == pruner.removed
    masked_final = pruner_m.finalize(out_m["student"], data, lambda *_: None)
    x = mx.nd.array(data.val.x[:32])
    a, b = small(x).asnumpy(), masked_final(x).asnumpy()
    assert np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(b).max())
    # the loop's losses follow the masked run's
    for ha, hb in zip(out["history"], out_m["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-3)


def test_optimizer_state_reset_starts_from_zero(tmp_path):
    _, pruner, watch, _ = _run(tmp_path / "reset", "each_update", epochs=2,
                               extra={"optimizer_state": "reset", "end_epoch": 1})
    assert len(pruner.rebuild_log) == 2 and watch.resets == 2 and watch.momentum_checked == 0


def test_cut_and_expand_are_inverse():
    rs = np.random.RandomState(0)
    a = rs.normal(size=(6, 4, 3, 3))
    keeps = [(0, np.array([1, 0, 1, 1, 0, 1], bool)), (1, np.array([0, 1, 1, 1], bool))]
    small = cut_array(a, keeps)
    assert small.shape == (4, 3, 3, 3)
    big = expand_array(small, keeps, a.shape)
    m = np.ones_like(a, bool)
    m[~keeps[0][1]] = False
    m[:, ~keeps[1][1]] = False
    assert np.array_equal(big[m], a[m]) and (big[~m] == 0).all()
    assert np.array_equal(cut_array(big, keeps), small)


@pytest.mark.parametrize("adapter", [False, True])
def test_hint_term_follows_the_cut_channels(adapter):
    """The hint loss of the masked student's map equals the loss of the cut map after
    ``keep_student_channels``: an adapter loses the same input columns; without one (equal
    widths) a frozen adapter scatters the kept channels back."""
    rs = np.random.RandomState(0)
    c_t = 6 if adapter else 8
    block = build_loss(LossTerm(loss="hint", weight=1.0, teacher_layer="t", student_layer="s"),
                       (2, 8, 4, 4), (2, c_t, 4, 4))
    block.initialize(mx.init.Normal(0.5), ctx=mx.cpu())
    block.hybridize(static_alloc=True)
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)
    s = rs.normal(size=(2, 8, 4, 4)).astype("float32") * keep[None, :, None, None]
    t = mx.nd.array(rs.normal(size=(2, c_t, 4, 4)))
    before = block(mx.nd.array(s), None, t).asnumpy()
    sliced = block.keep_student_channels(keep)
    after = block(mx.nd.array(s[:, keep]), None, t).asnumpy()
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert block.adapter.weight.shape == (c_t, 5, 1, 1)
    assert (sliced == {"adapter.weight": [(1, keep)]}) if adapter else (sliced == {})
    assert block.adapter.weight.grad_req == ("write" if adapter else "null")


def test_shrink_keys_are_checked():
    base = {"enabled": True, "granularity": "unstructured"}
    with pytest.raises(UserError, match="pruning.shrink"):
        recipe_from_dict({"pruning": {**base, "shrink": "each_update"}})
    with pytest.raises(UserError, match="pruning.optimizer_state"):
        recipe_from_dict({"pruning": {"enabled": True, "shrink": "end", "optimizer_state": "slice"}})
    with pytest.raises(UserError, match="pruning.shrink"):
        recipe_from_dict({"pruning": {"enabled": True, "shrink": "sometimes"}})
    assert recipe_from_dict({"pruning": {"enabled": True}}).pruning.shrink_mode() == "each_update"


def test_resume_after_a_kill_mid_schedule_rebuilds_the_same_shapes(tmp_path):
    """Killed after the second of three updates; ``--resume`` rebuilds the cut student from the
    checkpoint's plan before loading it, and ends where the uninterrupted run ends. A hint term
    on a pruned layer rides along (its adapter is cut too)."""
    t = tiny_teacher(tmp_path, epochs=1)
    pruning = {"enabled": True, "granularity": "channel", "final_sparsity": 0.6, "start_epoch": 0,
               "end_epoch": 2, "round_to": 4, "exclude": [], "keep_outputs": ["last"]}
    hint = {"loss": "hint", "weight": 0.5, "teacher_layer": "stage2_activation0",
            "student_layer": "stage2_activation0"}
    dist = [{"loss": "kd", "weight": 0.7, "temperature": 4.0}, {"loss": "ce", "weight": 0.3}, hint]
    paths = {}
    for name in ("ref", "cut"):
        paths[name] = tiny_student(tmp_path, t, name=name, epochs=4, model="cifar_resnet20_v1",
                                   pruning=pruning, distillation=dist,
                                   trainer={"optimizer": "nesterov"})
    # the teacher's graph names its layers cifarresnetv10_...: resolved by suffix on both sides
    res = run_cli(paths["ref"])
    assert res.returncode == 0, res.stderr[-3000:]
    rebuilt = res.stdout.count("rebuilt smaller")
    assert rebuilt >= 2
    run = os.path.join(tmp_path, "runs", "cut")
    kill_when(paths["cut"], os.path.join(run, "checkpoints", "epoch-0001.ckpt"))
    ck = read_checkpoint(os.path.join(run, "checkpoints", "epoch-0001.ckpt"))
    assert ck["modifiers"]["pruning"]["cut"] is True
    assert ck["modifiers"]["pruning"]["done"] == [0, 1]          # mid-schedule: one update to go
    res = run_cli(paths["cut"], "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    ref_run = os.path.join(tmp_path, "runs", "ref")
    hist = [json.load(open(os.path.join(r, "metrics.json")))["history"] for r in (ref_run, run)]
    assert [h["loss"] for h in hist[1]] == pytest.approx([h["loss"] for h in hist[0]], rel=1e-5)
    # the zoo student's name prefix counts the nets its process built (the reference run also
    # trained the teacher): compare by the rest of the name
    strip = lambda d: {re.sub(r"cifarresnetv1\d+_", "", k): v.asnumpy() for k, v in d.items()}
    pa, pb = (strip(mx.nd.load(os.path.join(r, "model-0000.params"))) for r in (ref_run, run))
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k].shape == pb[k].shape, k
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert "resumed with the student cut to the checkpoint's widths" in res.stdout
    m = json.load(open(os.path.join(run, "metrics.json")))
    p = m["student"]["pruning"]
    assert p["shrink"] == "each_update" and len(p["rebuilds"]) == rebuilt
    assert p["shrink_vs_mask_max_diff"] <= 1e-4 * 100
    # the checkpoint after the last update holds the cut student and its cut hint adapter
    last = read_checkpoint(os.path.join(run, "checkpoints", "epoch-0003.ckpt"))["params"]
    conv0 = [v for k, v in last.items() if k.endswith("conv0_weight") and "stage" not in k]
    assert conv0 and conv0[0].shape[0] < 16
    adapters = [v for k, v in last.items() if "adapter" in k]
    assert all(v.shape[1] < 32 for v in adapters)


def test_sparse_training_penalty_follows_the_cut_student(tmp_path):
    """``pruning.regularize`` on a student rebuilt at each update: its factors are cut like the
    weights, so training follows the masked run's (same channels, same losses) and the penalty
    still acts after the first cut (the losses differ from an unpenalised run)."""
    reg = {"regularize": {"kind": "group_l2", "strength": 0.05, "growth": 0.05}}
    out, pruner, _, data = _run(tmp_path / "each", "each_update", extra=reg)
    out_m, pruner_m, _, _ = _run(tmp_path / "end", "end", extra=reg)
    plain, _, _, _ = _run(tmp_path / "plain", "each_update")
    assert pruner.removed == pruner_m.removed and pruner.regularizer.strength > 0
    for ha, hb in zip(out["history"], out_m["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-3)
    # epoch 2 (index 1) trains on the cut student with the penalty on
    assert abs(out["history"][1]["loss"] - plain["history"][1]["loss"]) > 1e-3 * plain["history"][1]["loss"]
    x = mx.nd.array(data.val.x[:32])
    a = out["student"](x).asnumpy()
    b = pruner_m.finalize(out_m["student"], data, lambda *_: None)(x).asnumpy()
    # looser than without the penalty: λ·w/‖w_u‖ amplifies rounding on channels pushed to zero
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
