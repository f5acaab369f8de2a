"""Quantization-aware training (issue 13): the fake-quantized graph is MXNet's int8 graph (same
tensors quantized, same uint8/int8 choice, same outputs), the steps learn, a killed run resumes
to the uninterrupted result, NaN stops it, and the CLI flags reach the recipe."""
import argparse
import json
import os
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

from distill.data import load_data
from distill.quantize import cli as qcli
from distill.quantize.calibrators import calibrate
from distill.quantize.graph import FloatModel, inference_block, quantize
from distill.quantize.pipeline import load_with_overrides
from distill.quantize.qat import build_qat_net, quant_plan, run_qat
from distill.quantize.qat.fakequant import SCALE_SUFFIX
from distill.recipe import recipe_from_dict
from distill.trainer import TrainingDiverged, predict


class _Net(nn.HybridBlock):
    """conv-BN, depthwise conv-BN-ReLU6, 1×1 conv-BN + residual add, average pool, dense: every
    kind of node MobileNetV2's int8 graph has (uint8 and int8 outputs, a sum fused into a conv
    whose shortcut is int8, as MobileNetV2's linear bottlenecks have it)."""

    def __init__(self, classes=4):
        super().__init__()
        with self.name_scope():
            self.c0, self.b0 = nn.Conv2D(8, 3, padding=1, use_bias=False), nn.BatchNorm()
            self.dw, self.b1 = nn.Conv2D(8, 3, padding=1, groups=8, use_bias=False), nn.BatchNorm()
            self.pw, self.b2 = nn.Conv2D(8, 1, use_bias=False), nn.BatchNorm()
            self.pool, self.fc = nn.GlobalAvgPool2D(), nn.Dense(classes)

    def hybrid_forward(self, F, x):
        h = self.b0(self.c0(x))
        y = F.clip(self.b1(self.dw(h)), 0, 6)
        return self.fc(self.pool(self.b2(self.pw(y)) + h))


RECIPE = {"name": "qat_t", "data": {"name": "synthetic", "num_samples": 96, "num_classes": 4, "image_size": 8},
          "student": {"model": "mobilenet0.25"},
          "distillation": [{"loss": "ce", "weight": 0.3}],      # QAT adds KD against the teacher
          "quantization": {"calib_mode": "naive", "exclude": "none",
                           "qat": {"epochs": 2, "lr": 0.01, "freeze_bn_epoch": 1}},
          "trainer": {"batch_size": 16, "progress": False, "seed": 0}}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """The small net, trained a few steps on synthetic 8×8 digits so BN statistics are real; its
    PTQ thresholds; and a copy of it as the "teacher" pair."""
    tmp = tmp_path_factory.mktemp("qat")
    recipe = recipe_from_dict(RECIPE)
    data = load_data(recipe.data, seed=0)
    mx.random.seed(0)
    net = _Net()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    tr = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    for i in range(0, 64, 16):
        x, y = mx.nd.array(data.train.x[i:i + 16]), mx.nd.array(data.train.y[i:i + 16])
        with autograd.record():
            l = loss(net(x), y)
        l.backward()
        tr.step(16)
    prefix = os.path.join(str(tmp), "model")
    net.export(prefix, 0)
    tprefix = os.path.join(str(tmp), "teacher")
    net.export(tprefix, 0)
    model = FloatModel.from_prefix(prefix, (1, 8, 8))
    thresholds = calibrate(model, data.train.x[:48], "naive", 16)
    return SimpleNamespace(tmp=tmp, recipe=recipe, data=data, model=model, th=thresholds, teacher=tprefix)


@pytest.mark.isa
def test_plan_is_read_from_the_int8_graph(ctx):
    plan = quant_plan(ctx.model, ctx.th, [])
    g = quantize(ctx.model, ctx.th, [])
    assert {p.fused for p in plan.points.values()} == set(g.calib_layers)
    # every weight layer int8, but those this CPU keeps fp32 (FC without VNNI: graph.py)
    assert set(plan.weights) == set(ctx.model.layer_names) - set(ctx.model.host_fp32)
    relu6 = [p for p in plan.points.values() if "clip" in p.node]
    assert relu6 and all(p.unsigned and p.cap == 6.0 for p in relu6)
    assert not plan.points["_net0_batchnorm0_fwd"].unsigned      # conv + BN, no act: int8
    add = [p for p in plan.points.values() if "plus" in p.node or "add" in p.node]
    assert add and not any(p.unsigned for p in add)             # the residual sum stays int8
    assert plan.points["data"].unsigned == (ctx.th["data"][0] >= 0)


@pytest.mark.isa
@pytest.mark.parametrize("saturates", [True, False])
def test_both_branches_of_the_dense_saturation_probe(ctx, monkeypatch, saturates):
    """The probe's answer decides whether FullyConnected layers are int8: forced either way (as
    on a CPU with or without VNNI), the real int8 graph and the fake-quantized plan agree on it,
    and the int8 report lists what the CPU forced into fp32."""
    from distill.quantize import graph as qgraph
    monkeypatch.setattr(qgraph, "dense_int8_saturates", lambda: saturates)
    model = FloatModel.from_prefix(os.path.join(str(ctx.tmp), "model"), (1, 8, 8))
    fc = [l.name for l in model.layers if l.op == "FullyConnected"]
    assert fc and model.host_fp32 == (fc if saturates else [])
    g = quantize(model, ctx.th, [])
    quantized = {n["name"] for n in json.loads(g.symbol.tojson())["nodes"]
                 if str(n.get("attrs", {}).get("quantized", "")).lower() == "true"}
    fc_int8 = any("fully_connected" in n for n in quantized)
    assert fc_int8 is (not saturates)
    plan = quant_plan(model, ctx.th, [])
    assert (fc[0] in plan.weights) is (not saturates)
    assert g.excluded == []                        # the user's exclusions are not rewritten


@pytest.mark.isa
def test_fake_quant_is_the_deployed_int8_graph(ctx):
    """Same thresholds: the simulated logits are MXNet's int8 logits (up to a code of rounding
    here and there), far closer to them than fp32 is; the argmax agrees on ≥ 99% of images.
    The ranges are halved (as a clipping calibration such as ``entropy`` does), so int8 moves the
    outputs well beyond that rounding and a quantizer in the wrong place would show."""
    x = ctx.data.train.x
    th = {k: (lo * 0.5, hi * 0.5) for k, (lo, hi) in ctx.th.items()}
    plan = quant_plan(ctx.model, th, [])
    sim = predict(build_qat_net(ctx.model, plan), x)
    g = quantize(ctx.model, th, [])
    real = predict(inference_block(g.symbol, g.params), x)
    fp32 = predict(inference_block(ctx.model.fused, ctx.model.params), x)
    scale = np.abs(real).max()
    sim_err, fp32_err = np.abs(sim - real).mean() / scale, np.abs(fp32 - real).mean() / scale
    assert fp32_err > 0                                          # int8 does change the outputs
    assert sim_err < 0.2 * fp32_err, (sim_err, fp32_err)
    assert (sim.argmax(1) == real.argmax(1)).mean() >= 0.99


@pytest.mark.isa
def test_every_step_gets_a_gradient(ctx):
    plan = quant_plan(ctx.model, ctx.th, [])
    net = build_qat_net(ctx.model, plan)
    net.bn_frozen = True
    with autograd.record():
        out = net(mx.nd.array(ctx.data.train.x[:16]))
        (out ** 2).mean().backward()
    scales = {k: p for k, p in net.live.collect_params().items() if k.endswith(SCALE_SUFFIX)}
    assert len(scales) == len(plan.points)
    grads = {k: float(np.abs(p.grad().asnumpy()).sum()) for k, p in scales.items()}
    assert all(np.isfinite(v) for v in grads.values())
    assert sum(v > 0 for v in grads.values()) >= len(grads) - 1, grads   # round_ste passes gradient


def test_resume_gives_the_uninterrupted_result(ctx):
    """2 QAT epochs straight vs. 1 epoch, "killed" (the last checkpoint removed), --resume."""
    work = os.path.join(str(ctx.tmp), "straight")
    quiet = lambda *a, **k: None  # noqa: E731
    a = run_qat(ctx.model, ctx.th, [], ctx.data, ctx.recipe, work, ctx.teacher, log=quiet)
    assert a.section["method"] == "qat" and len(a.section["history"]) == 2
    assert a.section["losses"] == ["ce", "kd"]                  # KD by default when a teacher is there
    assert a.section["sim_int8_agreement"] >= 99.0
    assert abs(a.section["simulated_top1"] - a.section["int8_top1"]) <= 100.0 / len(ctx.data.val) + 1e-9
    ckpts = sorted(os.listdir(os.path.join(work, "checkpoints")))
    os.unlink(os.path.join(work, "checkpoints", ckpts[-1]))   # killed during epoch 2
    lines = []
    b = run_qat(ctx.model, ctx.th, [], ctx.data, ctx.recipe, work, ctx.teacher, resume=True, log=lines.append)
    assert any("continuing at epoch 2/2" in l for l in lines), lines
    for k, v in a.thresholds.items():
        np.testing.assert_allclose(b.thresholds[k], v, rtol=1e-5, atol=1e-7 * max(1.0, abs(v[1])))
    assert b.section["int8_top1"] == a.section["int8_top1"]


def test_nan_stops_and_keeps_the_last_good_checkpoint(ctx):
    raw = dict(RECIPE, quantization=dict(RECIPE["quantization"], qat={"epochs": 2, "lr": 1e30, "freeze_bn_epoch": 0}))
    work = os.path.join(str(ctx.tmp), "nan")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        run_qat(ctx.model, ctx.th, [], ctx.data, recipe_from_dict(raw), work, ctx.teacher, log=lambda *a: None)
    assert not os.path.exists(os.path.join(work, "thresholds.json"))


def test_cli_flags_reach_the_recipe(tmp_path):
    p = argparse.ArgumentParser()
    qcli.add_arguments(p)
    args = p.parse_args(["runs/x", "--qat-epochs", "2", "--qat-lr", "0.01", "--resume"])
    assert (args.qat_epochs, args.qat_lr, args.resume) == (2, 0.01, True)
    path = os.path.join(str(tmp_path), "r.yaml")
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(RECIPE, f)
    r = load_with_overrides(path, {"qat": {"epochs": 5, "lr": None}, "exclude": "first_last"})
    assert r.quantization.qat.epochs == 5 and r.quantization.qat.lr == 0.01      # lr kept from the recipe
    assert r.quantization.qat.freeze_bn_epoch == 1 and r.quantization.exclude == "first_last"
    assert qcli.DEFAULT_QAT_EPOCHS > 0
