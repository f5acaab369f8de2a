"""Any trained MXNet model as the teacher: a Module-API graph with branches, concat, grouped
and depthwise convolutions and a SoftmaxOutput head; inspect it, distill from logits + a hint."""
import json
import os

import mxnet as mx
import numpy as np
import pytest
import yaml

from distill.data import load_data
from distill.errors import UserError
from distill.recipe import DataConfig, TeacherConfig
from distill.teacher import load_teacher
from helpers import run_cli
from modapi import train_module


@pytest.fixture(scope="module")
def modapi_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modapi")
    data = load_data(DataConfig(name="digits"))
    prefix = str(tmp / "branchy")
    acc = train_module(prefix, data.train, data.val, epochs=10)
    return tmp, prefix, acc, data


def test_module_api_teacher_loads_and_strips_head(modapi_teacher):
    tmp, prefix, acc, data = modapi_teacher
    assert acc >= 90.0
    t = load_teacher(TeacherConfig(checkpoint=prefix), data)
    assert "softmax" not in t.symbol.list_outputs()[0]
    assert t.symbol.list_outputs() == ["fc_output"]
    from distill.trainer import evaluate
    assert evaluate(t.net, data.val) == pytest.approx(acc, abs=0.01)


def test_inspect_lists_layers_shapes_macs(modapi_teacher):
    _, prefix, _, _ = modapi_teacher
    res = run_cli("distill", "inspect", prefix, "--input-shape", "1,8,8", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    rows = {r["name"]: r for r in info["rows"]}
    assert rows["concat"]["shape"] == [1, 32, 8, 8] and rows["concat"]["tap"]
    # grouped conv: 16 out × (16/4 in × 3×3) × 8×8 positions
    assert rows["branch_b_gconv"]["macs"] == 16 * 4 * 9 * 64
    assert rows["dw_conv"]["macs"] == 32 * 1 * 9 * 64            # depthwise
    assert rows["fc"]["macs"] == 10 * 32 * 4 * 4
    assert rows["fc"]["params"] == 10 * 512 + 10
    assert "softmax" not in rows
    assert info["totals"]["macs"] == sum(r["macs"] for r in info["rows"])
    table = run_cli("distill", "inspect", prefix, "--input-shape", "1,8,8")
    assert "residual_add" in table.stdout and "total:" in table.stdout


def _hint_student(modapi_teacher, epochs):
    """A MobileNetV2-0.5 student distilled from the Module-API teacher with KD + CE + a hint on
    its concat; ``(teacher top-1 as trained, metrics, run folder)``."""
    tmp, prefix, acc, _ = modapi_teacher
    name = f"student{epochs}"
    recipe = {
        "name": f"modapi_{name}", "data": {"name": "digits"},
        "teacher": {"checkpoint": prefix, "epoch": 0},
        "student": {"model": "mobilenetv2_0.5"},
        "distillation": [
            {"loss": "kd", "weight": 0.7, "temperature": 4.0},
            {"loss": "ce", "weight": 0.3},
            {"loss": "hint", "weight": 1.0, "teacher_layer": "concat",
             "student_layer": "features_linearbottleneck5_elemwise_add0"}],
        "trainer": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "progress": False},
        "output": {"dir": str(tmp / "runs" / name), "latency_repeats": 2}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli(str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    return acc, json.load(open(tmp / "runs" / name / "metrics.json")), tmp / "runs" / name


def test_distill_mobilenetv2_from_logits_and_hint(modapi_teacher):
    acc, m, run = _hint_student(modapi_teacher, epochs=2)
    assert m["teacher"]["top1"] == pytest.approx(acc, abs=0.01)
    assert "hint" in m["history"][-1]["losses"] and len(m["history"]) == 2
    # the hint adapter (16/32 channels differ) is dropped at export: logits only
    sym = mx.sym.load(str(run / "model-symbol.json"))
    assert len(sym.list_outputs()) == 1 and not any("adapter" in a or "term" in a for a in sym.list_arguments())


@pytest.mark.slow
def test_hint_distilled_mobilenetv2_reaches_the_teacher(modapi_teacher):
    """15 epochs (about two minutes on 2 cores): the student within 2 points of the teacher."""
    acc, m, _ = _hint_student(modapi_teacher, epochs=15)
    assert m["student"]["top1"] >= m["teacher"]["top1"] - 2.0, (m["student"]["top1"], m["teacher"]["top1"])
    assert "hint" in m["history"][-1]["losses"]


def test_bad_tap_names_closest(modapi_teacher):
    _, prefix, _, data = modapi_teacher
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(checkpoint=prefix), data, taps=["concatt"])
    assert "concat" in str(e.value) and "teacher_layer" in str(e.value)


def test_params_mismatch_named(modapi_teacher, tmp_path):
    _, prefix, _, data = modapi_teacher
    params = mx.nd.load(prefix + "-0000.params")
    del params["arg:fc_weight"]
    mx.nd.save(str(tmp_path / "broken-0000.params"), params)
    os.symlink(prefix + "-symbol.json", tmp_path / "broken-symbol.json")
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "broken")), data)
    assert "fc_weight" in str(e.value)
    params = mx.nd.load(prefix + "-0000.params")
    params["arg:fc_weight"] = mx.nd.zeros((10, 99))
    mx.nd.save(str(tmp_path / "shape-0000.params"), params)
    os.symlink(prefix + "-symbol.json", tmp_path / "shape-symbol.json")
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "shape")), data)
    assert "fc_weight" in str(e.value) and "(10, 99)" in str(e.value)


def test_wrong_channels_and_classes(modapi_teacher):
    _, prefix, _, _ = modapi_teacher
    rgb = load_data(DataConfig(name="digits", grayscale=False))
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(checkpoint=prefix), rgb)
    assert "stem_conv_weight" in str(e.value) and "grayscale" in str(e.value)
    four = load_data(DataConfig(name="synthetic", num_classes=4, image_size=8))
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(checkpoint=prefix), four)
    assert "4 classes" in str(e.value)


def test_label_free_distillation(modapi_teacher):
    tmp, prefix, acc, _ = modapi_teacher
    recipe = {
        "name": "nolabels", "data": {"name": "digits", "labels": False},
        "teacher": {"checkpoint": prefix},
        "student": {"model": "mobilenet0.25"},
        "distillation": [{"loss": "kd", "weight": 1.0, "temperature": 2.0}],
        "trainer": {"epochs": 6, "batch_size": 32, "lr": 0.1, "progress": False},
        "output": {"dir": str(tmp / "runs" / "nolabels"), "latency": False}}
    path = tmp / "nolabels.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli(str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(tmp / "runs" / "nolabels" / "metrics.json"))
    assert m["history"][-1]["train_top1"] is None           # no labels were used
    assert m["student"]["top1"] >= 80.0                       # learned from the teacher alone
    bad = dict(recipe, distillation=[{"loss": "ce"}], name="nolabels_ce")
    path.write_text(yaml.safe_dump(bad))
    res = run_cli(str(path))
    assert res.returncode == 2 and "labels" in res.stderr
