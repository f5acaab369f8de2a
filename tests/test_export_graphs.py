"""``distill export`` on graph features of networks people trained elsewhere (issue 17).

Small Module-API symbols of our own, each exported once per module (pnnx and ncnn cost 1-3 s):

* PReLU after a convolution (slope ``(C,)`` on a 4-D input) and after a FullyConnected (2-D),
  and a FullyConnected on a 4-D input with no ``flatten`` attribute (MXNet flattens by default);
* a first layer that runs in place in ncnn: a BatchNorm on the data, or an in-graph
  ``(x - 0.5) * 2`` (``_minus_scalar``, ``_mul_scalar``);
* a planted crash of the runtime and a planted wrong layer: failed checks with a message.

The files are loaded with the runtimes' own APIs, as docs/export.md shows.
"""
import json
import os
import sys

import mxnet as mx
import numpy as np
import pytest
import yaml

from distill.data import load_data
from distill.export import ExportOptions, export_run
from distill.export.ncnn_pnnx import foreign_layers, pnnx_failure
from distill.export.onnx_fp32 import explicit_flatten, fix_prelu_slopes
from distill.export.parity import ExportMismatch
from distill.recipe import recipe_from_dict

NUM_CLASSES = 4


def _prelu_fc4d_net():
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="prelu1")          # slope (8,) on (N, 8, H, W)
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), stride=(2, 2), pad=(1, 1), name="conv2")
    x = mx.sym.Activation(x, act_type="relu", name="relu2")
    # symbol-API graphs write no `flatten`: MXNet flattens the (N, 8, 8, 8) input by default
    x = mx.sym.FullyConnected(x, num_hidden=16, name="fc1")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="prelu_fc")         # slope (16,) on (N, 16)
    x = mx.sym.FullyConnected(x, num_hidden=NUM_CLASSES, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def _inplace_first_net(first):
    data = mx.sym.var("data")
    if first == "batchnorm":       # fix_gamma=False: the stored gamma counts (issue 17 item 3 aside)
        x = mx.sym.BatchNorm(data, fix_gamma=False, name="bn_data")
    else:                          # in-graph normalisation: _minus_scalar, then _mul_scalar
        x = (data - 0.5) * 2.0
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
    x = mx.sym.Activation(x, act_type="relu", name="relu1")
    x = mx.sym.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1), name="gap")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=NUM_CLASSES, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def _checkpoint(tmp, name, sym, seed=0):
    """A run folder (synthetic 3×16×16 data) and a Module-API checkpoint of ``sym`` with random
    weights, PReLU slopes and BatchNorm statistics away from their defaults; its MXNet logits."""
    run_dir = str(tmp / "run")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "recipe.yaml"), "w") as f:
        yaml.safe_dump({"name": name, "data": {"name": "synthetic", "num_samples": 320,
                                               "num_classes": NUM_CLASSES, "channels": 3, "image_size": 16},
                        "output": {"latency_repeats": 2}}, f)
    with open(os.path.join(run_dir, "recipe.yaml")) as f:
        recipe = recipe_from_dict(yaml.safe_load(f))
    data = load_data(recipe.data, seed=recipe.trainer.seed)
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind(data_shapes=[("data", (1, 3, 16, 16))], label_shapes=[("softmax_label", (1,))])
    mx.random.seed(seed)
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    rng = np.random.RandomState(seed)
    for k, v in list(arg.items()) + list(aux.items()):
        if k.endswith("_gamma") and k.startswith("prelu"):
            v[:] = rng.uniform(0.05, 0.6, v.shape)           # a distinct slope per channel
        elif k.endswith(("_gamma", "_moving_var")):
            v[:] = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith(("_beta", "_moving_mean")):
            v[:] = rng.uniform(-0.5, 0.5, v.shape)
    mod.set_params(arg, aux)
    prefix = str(tmp / name)
    mod.save_checkpoint(prefix, 0)
    logits = mx.mod.Module(sym.get_internals()["fc_output"], label_names=None)
    logits.bind(data_shapes=[("data", data.val.x.shape)], for_training=False)
    logits.set_params(arg, aux, allow_extra=True)
    logits.forward(mx.io.DataBatch([mx.nd.array(data.val.x)]), is_train=False)
    return {"run": run_dir, "prefix": prefix, "data": data, "ref": logits.get_outputs()[0].asnumpy(),
            "out": os.path.join(run_dir, "export", name)}


def _ort(path, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(["logits"], {"data": x})[0]


def _ncnn_readme(param, bin_, x):
    """ncnn as docs/export.md shows it: the Mat is cloned, so an in-place first layer writes ncnn's copy."""
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1               # per-call OpenMP wake-ups cost more than these tiny images
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    assert net.load_param(param) == 0 and net.load_model(bin_) == 0
    out = []
    for img in x:
        img = np.ascontiguousarray(img, dtype=np.float32)
        before = img.copy()
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(img).clone())
        ret, mat = ex.extract("out0")
        assert ret == 0
        out.append(np.array(mat).reshape(-1))
        assert np.array_equal(img, before)               # the caller's image is untouched
    return np.stack(out)


def _scratch_left(folder):
    return [f for f in os.listdir(folder) if f.startswith(".export-")]


# -- PReLU and a FullyConnected on a 4-D input ----------------------------------------------------

@pytest.fixture(scope="module")
def prelu_export(tmp_path_factory):
    m = _checkpoint(tmp_path_factory.mktemp("prelu"), "prelu_fc4d", _prelu_fc4d_net())
    m["card"] = export_run(m["run"], formats=["mxnet", "onnx", "ncnn"], model=m["prefix"],
                           options=ExportOptions(latency=False), raise_on_failure=False)
    return m


def test_prelu_and_unflattened_fc_reach_onnxruntime_and_ncnn(prelu_export):
    m = prelu_export
    # random weights: the logits must still depend on the image, or agreement means nothing
    assert np.ptp(m["ref"], axis=0).max() > 0.1 * np.abs(m["ref"]).max()
    scale = np.abs(m["ref"]).max()
    onnx_logits = _ort(os.path.join(m["out"], "model.onnx"), m["data"].val.x)
    assert np.abs(onnx_logits - m["ref"]).max() <= 3e-5 * max(1.0, scale)
    ncnn_logits = _ncnn_readme(os.path.join(m["out"], "model.ncnn.param"),
                               os.path.join(m["out"], "model.ncnn.bin"), m["data"].val.x)
    assert np.abs(ncnn_logits - m["ref"]).max() <= 1e-4 * max(1.0, scale)
    exports = m["card"]["exports"]
    assert all(e["check"]["passed"] for e in exports.values()), {n: e["check"] for n, e in exports.items()}
    assert exports["onnx"]["parity"]["rel_max_diff"] <= 3e-5
    layers = [line.split()[0] for line in open(os.path.join(m["out"], "model.ncnn.param")).read().splitlines()[2:]]
    assert layers.count("PReLU") == 2 and layers.count("InnerProduct") >= 2
    assert not _scratch_left(m["out"])


def test_onnx_graph_fixes_on_the_exporter_output(prelu_export):
    import onnx
    from onnx import numpy_helper
    m = prelu_export
    model = onnx.load(os.path.join(m["out"], "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    slopes = {n.name: inits[n.input[1]].shape for n in model.graph.node if n.op_type == "PRelu"}
    assert slopes == {"prelu1": (8, 1, 1), "prelu_fc": (16,)}      # per rank: (N,C,H,W) and (N,C)
    producer = {o: n for n in model.graph.node for o in n.output}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and "Reshape" not in [n.op_type for n in model.graph.node]
    for g in gemms:                          # both FCs flatten to (N, C·H·W) first, as in MXNet
        flat = producer[g.input[0]]
        assert flat.op_type == "Flatten" and all(a.i == 1 for a in flat.attribute if a.name == "axis")
    # the fixes on their own: the symbol JSON gets flatten written out; the MXNet pair is unchanged
    with open(m["prefix"] + "-symbol.json") as f:
        text, changed = explicit_flatten(f.read())
    assert changed == ["fc1", "fc"]
    assert all(n["attrs"]["flatten"] == "True" for n in json.loads(text)["nodes"] if n["op"] == "FullyConnected")
    with open(os.path.join(m["out"], "model-symbol.json")) as f:
        assert not any("flatten" in n.get("attrs", {}) for n in json.loads(f.read())["nodes"])
    raw = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("PRelu", ["x", "s"], ["y"], name="p")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3, 5, 5])],
        [numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "s")]))
    assert fix_prelu_slopes(raw) == ["p"] and tuple(raw.graph.initializer[0].dims) == (3, 1, 1)
    assert fix_prelu_slopes(raw) == []                              # already (C, 1, 1): unchanged


def test_a_wrong_layer_is_a_failed_check_naming_it(prelu_export, tmp_path, monkeypatch):
    """A real mismatch: conv2's weights off by 2 % in the ONNX file. The check fails, with a
    message naming conv2 as the first layer at fault (MXNet and onnxruntime compared layer by layer)."""
    from onnx import numpy_helper
    from distill.export import onnx_fp32
    m, fix = prelu_export, onnx_fp32.fix_prelu_slopes

    def spoil(model):
        for i in model.graph.initializer:
            if i.name == "conv2_weight":
                i.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(i) * 1.02, i.name))
        return fix(model)

    monkeypatch.setattr(onnx_fp32, "fix_prelu_slopes", spoil)
    card = export_run(m["run"], formats=["onnx"], model=m["prefix"], out_dir=str(tmp_path),
                      options=ExportOptions(latency=False), raise_on_failure=False)
    check = card["exports"]["onnx"]["check"]
    assert not check["passed"]
    assert "max abs logit difference from MXNet" in check["message"]
    assert "First layer at fault: conv2 (Convolution)" in check["message"], check["message"]
    assert "top-1 agreement" in check["message"] and "Traceback" not in check["message"]
    assert not _scratch_left(str(tmp_path))


def test_a_layer_onnxruntime_rejects_is_named(prelu_export, tmp_path, monkeypatch):
    """Without the slope fix (MXNet's exporter as it is), onnxruntime and pnnx reject PRelu: both
    checks fail with one paragraph naming the layer, and neither blames a missing ncnn operator."""
    from distill.export import onnx_fp32
    m = prelu_export
    monkeypatch.setattr(onnx_fp32, "fix_prelu_slopes", lambda model: [])
    card = export_run(m["run"], formats=["onnx", "ncnn"], model=m["prefix"], out_dir=str(tmp_path),
                      options=ExportOptions(latency=False), raise_on_failure=False)
    onnx_msg = card["exports"]["onnx"]["check"]["message"]
    assert onnx_msg.startswith("onnxruntime could not run model.onnx at layer 'prelu1' (PRelu): "
                               "Attempting to broadcast"), onnx_msg
    ncnn_msg = card["exports"]["ncnn"]["check"]["message"]
    assert "pnnx could not convert model.onnx" in ncnn_msg and "PRelu node" in ncnn_msg, ncnn_msg
    assert "not an operator ncnn lacks" in ncnn_msg
    assert not any("\x1b" in msg or "Traceback" in msg for msg in (onnx_msg, ncnn_msg))
    assert not _scratch_left(str(tmp_path))


def test_pnnx_failure_messages_say_what_failed():
    # pnnx's own output on an unflattened Gemm (the exporter's graph before the fix); it then segfaults
    out = ("fold_constants ...   ort CreateSession failed Node (fc_gemm) Op (Gemm) "
           "[ShapeInferenceError] Dimension mismatch in unification between 512 and 8")
    msg = pnnx_failure("model.onnx", -11, out)
    assert "shape inference failed at Gemm node 'fc_gemm'" in msg and "killed by signal 11" in msg
    assert "not an operator ncnn lacks" in msg
    assert "lacks is named" in pnnx_failure("model.onnx", 1, "layer Foo not supported")
    param = "7767517\n3 3\nInput in0 0 1 in0\nF.grid_sample op_1 1 1 in0 1\nInnerProduct fc 1 1 1 out0 0=4\n"
    assert foreign_layers(param) == [("op_1", "F.grid_sample")]


# -- a first layer that runs in place in ncnn -----------------------------------------------------

@pytest.fixture(scope="module", params=["batchnorm", "minus_scalar"])
def inplace_export(request, tmp_path_factory):
    m = _checkpoint(tmp_path_factory.mktemp(request.param), f"first_{request.param}",
                    _inplace_first_net(request.param))
    m["card"] = export_run(m["run"], formats=["onnx", "ncnn"], model=m["prefix"],
                           options=ExportOptions(latency=False), raise_on_failure=False)
    m["first"] = request.param
    return m


def test_in_place_first_layer_runs_in_ncnn(inplace_export):
    m = inplace_export
    with open(m["prefix"] + "-symbol.json") as f:
        ops = [n["op"] for n in json.loads(f.read())["nodes"] if n["op"] != "null"]
    assert ops[0] == {"batchnorm": "BatchNorm", "minus_scalar": "_minus_scalar"}[m["first"]]
    exports = m["card"]["exports"]
    assert all(e["check"]["passed"] for e in exports.values()), {n: e["check"] for n, e in exports.items()}
    assert exports["ncnn"]["parity"]["images"] == len(m["data"].val.x)
    logits = _ncnn_readme(os.path.join(m["out"], "model.ncnn.param"), os.path.join(m["out"], "model.ncnn.bin"),
                          m["data"].val.x)
    assert np.abs(logits - m["ref"]).max() <= 1e-4 * max(1.0, np.abs(m["ref"]).max())
    assert not _scratch_left(m["out"])


# -- a runtime that crashes during the check ------------------------------------------------------

def test_a_runtime_crash_is_a_failed_check_not_a_dead_export(prelu_export, tmp_path, monkeypatch):
    m = prelu_export
    crash = tmp_path / "crash.sh"                 # stands in for a segfault inside the runtime
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    out = tmp_path / "out"
    with pytest.raises(ExportMismatch) as err:
        export_run(m["run"], formats=["mxnet", "onnx", "ncnn"], model=m["prefix"], out_dir=str(out),
                   options=ExportOptions(latency=False))
    assert "onnx: onnxruntime was killed by signal 11" in str(err.value)
    assert "ncnn: ncnn's runtime was killed by signal 11" in str(err.value)
    card = json.load(open(out / "model_card.json"))
    checks = {n: e["check"]["passed"] for n, e in card["exports"].items()}
    assert checks == {"mxnet": True, "onnx": False, "ncnn": False}
    assert "kept for inspection" in card["exports"]["ncnn"]["check"]["message"]
    assert not _scratch_left(str(out))
