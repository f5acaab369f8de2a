"""``ncnn-int8``: the .bin writer round-trips, unknown layer types stop it, and a channel-pruned
Module-API graph (concat, grouped and depthwise convolutions) runs int8 in ncnn's own runtime
within a point of fp32 MXNet. (The mnist student's figures are asserted in test_export.py, on
the export its fixture already makes.)"""
import hashlib
import os
import struct

import mxnet as mx
import numpy as np
import pytest
import yaml

from distill.errors import UserError
from distill.export.ncnn_bin import (INT8_TYPES, KNOWN_WEIGHTED, TAG_FP16, TAG_INT8, Layer, NcnnModel,
                                     layer_segments, parse_param, read_bin, read_table, requantize_pairs, weight_rows,
                                     write_int8, write_param)
from distill.export.ncnn_calib import abs_histogram, match_tensors, ncnn_kl_threshold
from distill.export.ncnn_int8 import write_int8_files

# One layer of every weighted type the walker knows (ncnn param ids as in src/layer/*.cpp).
SAMPLES = {
    "Convolution": {"0": "4", "1": "3", "11": "3", "5": "1", "6": str(4 * 2 * 9)},        # 3×3 s1: 6 bit
    "ConvolutionDepthWise": {"0": "4", "1": "3", "5": "1", "6": str(4 * 2 * 9), "7": "2"},  # grouped
    "InnerProduct": {"0": "3", "1": "1", "2": str(3 * 8)},
    "Deconvolution": {"0": "2", "1": "2", "5": "1", "6": "16"},
    "DeconvolutionDepthWise": {"0": "2", "1": "2", "5": "1", "6": "8", "7": "2"},
    "BatchNorm": {"0": "3"}, "Bias": {"0": "3"}, "Scale": {"0": "3", "1": "1"}, "PReLU": {"0": "3"},
    "Normalize": {"3": "3"}, "Padding": {"6": "3"}, "LayerNorm": {"0": "4"}, "RMSNorm": {"0": "4"},
    "GroupNorm": {"1": "4"}, "InstanceNorm": {"0": "4"}, "MemoryData": {"0": "2", "1": "3", "2": "1"},
    "Embed": {"0": "2", "1": "5", "2": "1", "3": "10"},
    "Gemm": {"5": "1", "6": "1", "7": "1", "8": "3", "9": "4", "10": "4"},
}


def _model(types, extra=()):
    layers = [Layer("Input", "in", [], ["b0"], {"0": "8"})]
    for i, t in enumerate(list(types) + list(extra)):
        layers.append(Layer(t, f"l{i}_{t.lower()}", [f"b{i}"], [f"b{i + 1}"], dict(SAMPLES.get(t, {}))))
    return NcnnModel(layers, len(layers))


def _bin(model, rs, fp16=()):
    """A .bin for ``model`` as pnnx writes it: tag 0 + fp32 before each tagged array (fp16 for
    the layers named in ``fp16``), raw fp32 otherwise. Returns (bytes, {layer: {seg: values}})."""
    chunks, values = [], {}
    for l in model.layers:
        for s in layer_segments(l):
            v = rs.normal(size=s.count).astype(np.float32)
            if l.type == "Convolution" and s.name == "weight_data":
                v.reshape(4, -1)[2] = 0                           # a pruned output channel
            if s.tagged and l.name in fp16:
                v = v.astype(np.float16).astype(np.float32)
                data = struct.pack("<I", TAG_FP16) + v.astype("<f2").tobytes()
                data += b"\0" * (-len(data) % 4)
            elif s.tagged:
                data = struct.pack("<I", 0) + v.astype("<f4").tobytes()
            else:
                data = v.astype("<f4").tobytes()
            chunks.append(data)
            values.setdefault(l.name, {})[s.name] = v
    return b"".join(chunks), values


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-source", "fp16-source"])
def test_int8_bin_round_trips_for_every_known_layer_type(fp16):
    model = _model(KNOWN_WEIGHTED, extra=("ReLU", "Split", "Concat"))
    assert {l.type for l in model.layers} >= set(KNOWN_WEIGHTED)
    rs = np.random.RandomState(0)
    data, values = _bin(model, rs, fp16={l.name for l in model.layers} if fp16 else ())
    arrays = read_bin(model, data)
    for name, segs in values.items():                      # the walker reads what was written
        for seg, v in segs.items():
            np.testing.assert_array_equal(arrays[name][seg].values, v)
    scales = {l.name: 20.0 + i for i, l in enumerate(model.layers) if l.type in INT8_TYPES}
    int8, out, wscales = write_int8(model, data, scales)
    assert set(wscales) == set(scales)
    assert requantize_pairs(model, set(scales)) == {"l0_convolution": "l1_convolutiondepthwise"}
    # the int8 .param and .bin read back with the same walker, to the exact end of the file
    text = write_param(int8)
    again = parse_param(text)
    back = read_bin(again, out)
    for l in again.layers:
        if l.type not in INT8_TYPES:
            for seg, v in values.get(l.name, {}).items():
                np.testing.assert_array_equal(back[l.name][seg].values, v)        # copied as is
            continue
        assert l.get(8) % 100 == (1 if l.type == "ConvolutionDepthWise" else 2)
        seg = back[l.name]
        if l.get(8) > 100:                         # requantized to the next int8 conv's input scale
            nxt = next(k for k in again.layers if k.bottoms == l.tops)
            assert seg["top_blob_int8_scales"].values[0] == np.float32(scales[nxt.name])
        assert seg["weight_data"].tag == TAG_INT8 and seg["weight_data"].values.dtype == np.int8
        ws = seg["weight_data_int8_scales"].values
        assert len(ws) == weight_rows(l) and seg["bottom_blob_int8_scales"].values[0] == np.float32(scales[l.name])
        np.testing.assert_array_equal(seg["bias_data"].values, values[l.name]["bias_data"])
        w = values[l.name]["weight_data"].reshape(len(ws), -1)
        deq = seg["weight_data"].values.reshape(len(ws), -1).astype(np.float32) / ws[:, None]
        step = 1.0 / ws[:, None]
        assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-6), l.type      # within half a step
        levels = 31 if l.type == "Convolution" else 127                    # 3×3 s1: ncnn2table's 6 bit
        q = seg["weight_data"].values.reshape(len(ws), -1)
        nonzero = np.abs(w).max(1) > 0
        assert (np.abs(q).max(1)[nonzero] == levels).all()
        if l.type == "Convolution":                         # the all-zero channel: scale 1, zeros
            assert ws[2] == 1.0 and not q[2].any()
    # model.table: what ncnn2int8 reads, the same scales
    from distill.export.ncnn_bin import write_table
    wt, bt = read_table(write_table(wscales, scales))
    assert bt == pytest.approx(scales) and all(np.array_equal(wt[k], v) for k, v in wscales.items())


def test_walker_checks_the_total_size():
    model = _model(["Convolution", "BatchNorm"])
    data, _ = _bin(model, np.random.RandomState(1))
    with pytest.raises(UserError, match="ends at byte"):
        read_bin(model, data + b"\0\0\0\0")
    with pytest.raises(UserError, match="ends inside|ends before"):
        read_bin(model, data[:-4])


def _write_pair(folder, model, data):
    param, bin_ = os.path.join(folder, "model.ncnn.param"), os.path.join(folder, "model.ncnn.bin")
    with open(param, "w") as f:
        f.write(write_param(model))
    with open(bin_, "wb") as f:
        f.write(data)
    return param, bin_


@pytest.mark.parametrize("bad", ["FancyConv", "LSTM"])
def test_unknown_layer_type_stops_naming_layer_and_type(tmp_path, bad):
    model = _model(["Convolution", "InnerProduct"])
    data, _ = _bin(model, np.random.RandomState(2))
    model.layers.insert(2, Layer(bad, "mystery_7", ["b1"], ["b1x"], {"0": "4"}))
    param, bin_ = _write_pair(str(tmp_path), model, data)
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (param, bin_)}
    dst = [str(tmp_path / n) for n in ("model-int8.ncnn.param", "model-int8.ncnn.bin", "model.table")]
    with pytest.raises(UserError, match=rf"ncnn layer 'mystery_7' has type '{bad}'.*fp32 model\.ncnn\.\* files are unchanged"):
        write_int8_files(param, bin_, {"l0_convolution": 10.0}, *dst)
    assert not any(os.path.exists(p) for p in dst)
    assert sorted(os.listdir(tmp_path)) == ["model.ncnn.bin", "model.ncnn.param"]   # no temp files
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (param, bin_)}


def test_kl_threshold_clips_a_long_tail_and_matching_by_value():
    rs = np.random.RandomState(0)
    x = np.abs(rs.normal(size=50000)).astype(np.float32)
    x[:10] = 40.0                                           # a few outliers stretch the range
    t = ncnn_kl_threshold(abs_histogram(x, 40.0), 40.0)
    assert 2.0 < t < 10.0                                   # KL clips the outliers, keeps the bulk
    assert abs_histogram(np.zeros(5), 1.0).sum() == 0        # exact zeros are skipped
    a, b = rs.normal(size=(2, 12)), rs.normal(size=(2, 12))
    got = match_tensors({"1": a + 1e-6, "2": b, "3": rs.normal(size=(2, 12))},
                        {"x_output": a, "y_output": b, "z_output": rs.normal(size=(2, 5))})
    assert got == {"1": "x_output", "2": "y_output", "3": None}


# -- a channel-pruned Module-API graph in ncnn's runtime ---------------------------------------

@pytest.fixture(scope="module")
def pruned_module_export(tmp_path_factory):
    """tests/modapi.py's branchy graph (concat, grouped + depthwise convs, residual add), trained
    on digits, half its prunable channels cut out, fine-tuned, then exported to ncnn and ncnn-int8."""
    from distill.data import load_data
    from distill.export import ExportOptions, export_run
    from distill.graphio import load_pair
    from distill.pruning.apply import shrink
    from distill.pruning.graph import analyze
    from distill.pruning.plan import choose_removed
    from distill.recipe import DataConfig
    from modapi import train_module
    tmp = tmp_path_factory.mktemp("ncnn_int8_modapi")
    data = load_data(DataConfig(name="digits"))
    dense = str(tmp / "branchy")
    train_module(dense, data.train, data.val, epochs=6)
    sym, params = load_pair(dense, 0)
    g = analyze(sym, (1, 1, 8, 8))
    scores = {u: float(np.random.RandomState(u).rand()) for u in g.prunable_units()}
    removed = choose_removed(g, scores, {grp.id: 0.5 for grp in g.groups}, round_to=4)
    small_sym, small = shrink(g, params, removed)
    # fine-tune the smaller graph a little (Module API, as a user would)
    mx.random.seed(0)
    head = mx.sym.SoftmaxOutput(small_sym, name="softmax")
    mod = mx.mod.Module(head, data_names=["data"], label_names=["softmax_label"])
    it = mx.io.NDArrayIter(data.train.x, data.train.y.astype("float32"), 64, shuffle=True,
                           label_name="softmax_label")
    args, auxs = set(small_sym.list_arguments()), set(small_sym.list_auxiliary_states())
    mod.fit(it, num_epoch=3, optimizer="adam", optimizer_params={"learning_rate": 0.002},
            arg_params={k: v for k, v in small.items() if k in args},
            aux_params={k: v for k, v in small.items() if k in auxs}, eval_metric="acc")
    prefix = str(tmp / "branchy_pruned")
    mod.save_checkpoint(prefix, 0)
    run_dir = str(tmp / "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "recipe.yaml"), "w") as f:
        yaml.safe_dump({"name": "modapi_pruned", "data": {"name": "digits"},
                        "output": {"latency_repeats": 2}}, f)
    card = export_run(run_dir, formats=["ncnn", "ncnn-int8"], model=prefix,
                      options=ExportOptions(calib_size=128, repeats=2))
    return {"card": card, "data": data, "out": os.path.join(run_dir, "export", "branchy_pruned"),
            "dense_params": params, "small": small, "run": run_dir, "prefix": prefix}


def ncnn_int8_logits(param, bin_, x):
    """Logits of an int8 ncnn model in ncnn's runtime (int8 inference on), one image at a time."""
    import ncnn
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    net.opt.use_int8_inference = True
    assert net.load_param(param) == 0 and net.load_model(bin_) == 0
    out = []
    for img in x:
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(img)).clone())
        ret, mat = ex.extract("out0")
        assert ret == 0
        out.append(np.array(mat).reshape(-1))
    return np.stack(out)


def int8_layer_share(param_path):
    """(int8 layers, candidate layers) of an ncnn .param: Convolution/DepthWise/InnerProduct with 8=."""
    with open(param_path) as f:
        model = parse_param(f.read())
    cands = [l for l in model.layers if l.type in INT8_TYPES]
    return sum(1 for l in cands if l.get(8, 0)), len(cands)


def test_pruned_module_graph_int8_in_ncnn(pruned_module_export):
    m = pruned_module_export
    e, out, d = m["card"]["exports"]["ncnn-int8"], m["out"], m["data"]
    assert m["small"]["stem_conv_weight"].shape[0] < m["dense_params"]["stem_conv_weight"].shape[0]
    with open(os.path.join(out, "model.ncnn.param")) as f:
        types = [line.split()[0] for line in f.read().splitlines()[2:]]
    assert {"Concat", "ConvolutionDepthWise", "InnerProduct"} <= set(types)
    logits = ncnn_int8_logits(os.path.join(out, "model-int8.ncnn.param"),
                               os.path.join(out, "model-int8.ncnn.bin"), d.val.x)
    top1 = float((logits.argmax(1) == d.val.y).mean() * 100)
    assert top1 == pytest.approx(e["parity"]["top1"], abs=1e-6)             # the card tells the truth
    assert e["parity"]["top1_mxnet"] >= 80.0                                # a real classifier
    assert e["parity"]["top1_mxnet"] - top1 <= 1.0 + 1e-9 and e["check"]["passed"]
    n8, n = int8_layer_share(os.path.join(out, "model-int8.ncnn.param"))
    assert n8 >= 0.8 * n and n8 == e["int8_layers"]["int8"]
    assert os.path.getsize(os.path.join(out, "model-int8.ncnn.bin")) <= 0.4 * os.path.getsize(
        os.path.join(out, "model.ncnn.bin"))
    q = e["quantization"]
    assert q["blobs_from_mxnet"] >= 1 and q["blobs_from_mxnet"] + q["blobs_calibrated_in_ncnn"] >= 1
    assert set(q["layer_map"].values()) >= {"stem_conv", "branch_b_gconv", "dw_conv", "fc"}
    assert e["mxnet_int8"]["top1_agreement"] >= 95.0
    assert e["latency_ms"]["b1"] > 0 and e["ncnn_fp32"]["latency_ms"]["b1"] > 0
    text = open(os.path.join(os.path.dirname(out), "branchy_pruned", "MODEL_CARD.md")).read()
    assert "## ncnn int8" in text and "use_int8_inference" in text and "x86" in text


def test_int8_exclude_and_policy_rows_in_ncnn(pruned_module_export, tmp_path):
    """``--int8-exclude`` keeps that MXNet layer fp32 in ncnn too (no blob scale, no ``8=``), and
    ``--policies`` measures full int8, first_last and auto in ncnn's runtime."""
    from distill.export import ExportOptions, export_run
    m = pruned_module_export
    card = export_run(m["run"], formats=["ncnn-int8"], model=m["prefix"], out_dir=str(tmp_path),
                      options=ExportOptions(calib_size=128, latency=False, int8_exclude=("dw_conv",),
                                            ncnn_policies=True))
    e = card["exports"]["ncnn-int8"]
    dw = [n for n, layer in e["quantization"]["layer_map"].items() if layer == "dw_conv"]
    assert len(dw) == 1 and e["quantization"]["excluded_ncnn_layers"] == dw
    with open(tmp_path / "model-int8.ncnn.param") as f:
        model = parse_param(f.read())
    assert model.layer(dw[0]).get(8, 0) == 0
    n8, n = int8_layer_share(str(tmp_path / "model-int8.ncnn.param"))
    assert n8 == n - 1 and dw[0] not in read_table((tmp_path / "model.table").read_text())[1]
    rows = {r["policy"]: r for r in e["policies"]}
    assert rows["none"]["int8_layers"] == n and rows["first_last"]["int8_layers"] == n - 2
    assert set(rows["first_last"]["mxnet_layers_fp32"]) == {"stem_conv", "fc"}
    assert all(abs(r["top1"] - e["parity"]["top1_mxnet"]) <= 5 for r in rows.values())
    assert "ncnn int8 policy first_last" in "\n".join(e["report_notes"])


def test_a_crash_in_ncnn_becomes_an_error_message(tmp_path, monkeypatch):
    import sys
    from distill.export.ncnn_worker import NcnnWorkerError, run_ncnn
    with pytest.raises(NcnnWorkerError, match=r"exited with code 1 .*could not load"):
        run_ncnn([{"task": "predict", "param": str(tmp_path / "none.param"), "bin": "x", "x": "x"}],
                 {"x": np.zeros((1, 1, 2, 2), np.float32)}, str(tmp_path))
    crash = tmp_path / "crash.sh"                  # stands in for a segfault inside ncnn
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    with pytest.raises(NcnnWorkerError, match="killed by signal 11"):
        run_ncnn([{"task": "predict", "param": "p", "bin": "b", "x": "x"}],
                 {"x": np.zeros((1, 1, 2, 2), np.float32)}, str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ncnn-")]     # exchange files removed
