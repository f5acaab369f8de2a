"""Every consumer of a run's data reads a bounded sample, a batch at a time (issue #26 item 2).

A streamed split (recordio, image folders) is a lazy array: ``x[idx]`` decodes a batch, and
nothing may hold the whole split. :class:`GuardedImages` has that surface and no more: it
refuses ``np.asarray``, iteration and any other attribute, and counts the images each read
returns. Each consumer runs on a digits :class:`~distill.data.DataBundle` whose images are
guarded, with batch sizes far below the splits (1,437 train / 360 val images): the largest
single read must stay within the consumer's configured batch, and the total within its sample.
"""
import dataclasses
import os
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
import yaml

from distill.data import Split, load_data
from distill.graphio import save_pair
from distill.quantize.graph import FloatModel
from distill.recipe import DataConfig, QuantizationConfig, recipe_from_dict, recipe_to_dict
from distill.runfolder import RunFolder

EVAL_BS = 50            # trainer.eval_batch_size and export --eval-batch-size
CALIB_BS, CALIB_BATCHES = 16, 3
BATCH = 64              # the largest batch any consumer here may read (probe BN batches)


class GuardedImages:
    """A lazy image array: ``shape``, ``dtype``, ``ndim``, ``len()``, ``x[int | slice | int array
    | bool mask]``, ``is_streamed``, ``batch``, ``subset``; anything else raises. ``stats`` (shared
    with its subsets) records the largest read (images) and the total."""

    _SURFACE = ("shape", "dtype", "ndim", "is_streamed", "batch", "subset")
    is_streamed = True

    def __init__(self, x, stats=None):
        self._x = x
        self.stats = stats if stats is not None else {"max": 0, "total": 0, "calls": 0}

    def __getattribute__(self, name):
        if name.startswith("_") or name in GuardedImages._SURFACE or name == "stats" \
                or name in ("__class__", "__len__", "__getitem__", "__dict__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"a consumer asked the streamed images for {name!r}")

    @property
    def shape(self):
        return self._x.shape

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def ndim(self):
        return 4

    def __len__(self):
        return len(self._x)

    def __array__(self, *a, **k):
        raise AssertionError("np.asarray of a whole streamed split")

    def __iter__(self):
        raise AssertionError("iterating over a whole streamed split")

    def __getitem__(self, key):
        if isinstance(key, tuple):
            raise AssertionError(f"streamed images are indexed by images only, got {key!r}")
        out = np.ascontiguousarray(self._x[key], dtype=np.float32)
        n = 1 if out.ndim == 3 else len(out)
        s = self.stats
        s["max"], s["total"], s["calls"] = max(s["max"], n), s["total"] + n, s["calls"] + 1
        return out

    def batch(self, idx, augment=(), seed=0):
        return self[np.asarray(idx, np.int64)], np.ones(len(idx), bool)

    def subset(self, positions):
        return GuardedImages(self._x[np.asarray(positions, np.int64)], self.stats)


def _guard(split, stats):
    return Split(GuardedImages(split.x, stats), split.y)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits"), seed=0)


@pytest.fixture
def guarded(digits):
    """``(bundle, stats)``: the digits bundle with every split's images guarded."""
    stats = {"train": {"max": 0, "total": 0, "calls": 0}, "val": {"max": 0, "total": 0, "calls": 0}}
    bundle = dataclasses.replace(digits, train=_guard(digits.train, stats["train"]),
                                 val=_guard(digits.val, stats["val"]))
    return bundle, stats


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """conv-BN-ReLU ×2, pooling, dense on (1, 8, 8) → 10 classes, as a run folder's model pair
    (with its recipe): ``(run_dir, symbol, params)``."""
    from mxnet.gluon import nn
    mx.random.seed(0)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(16, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((2, 1, 8, 8)))
    run_dir = str(tmp_path_factory.mktemp("bounded") / "run")
    folder = RunFolder(run_dir)
    os.makedirs(run_dir)
    net.export(folder.model_prefix, 0)
    recipe = _recipe(run_dir)
    with open(folder.recipe_path, "w") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f)
    sym = mx.sym.load(folder.model_prefix + "-symbol.json")
    params = {k.split(":", 1)[1]: v for k, v in mx.nd.load(folder.model_prefix + "-0000.params").items()}
    return run_dir, sym, params


def _recipe(run_dir, **quant):
    return recipe_from_dict({
        "name": "bounded", "data": {"name": "digits"}, "student": {"model": "mobilenet0.25"},
        "distillation": [{"loss": "ce"}],   # QAT adds KD against the teacher it is given
        "trainer": {"epochs": 1, "batch_size": 32, "eval_batch_size": EVAL_BS, "progress": False},
        "quantization": {"calib_batches": CALIB_BATCHES, "calib_batch_size": CALIB_BS, "exclude": "auto",
                         **quant},
        "output": {"dir": run_dir, "latency": False}})


def _model(tiny_pair):
    return FloatModel.from_prefix(RunFolder(tiny_pair[0]).model_prefix, (1, 8, 8))


def _bounded(stats, most=BATCH):
    assert 0 < stats["max"] <= most, stats


def test_guard_refuses_whole_reads(digits):
    g = GuardedImages(digits.val.x)
    for bad in (lambda: np.asarray(g), lambda: list(g), lambda: g.astype(np.float32), lambda: g * 2,
                lambda: mx.nd.array(g)):
        with pytest.raises((AssertionError, TypeError)):
            bad()
    assert g[:3].shape == (3, 1, 8, 8) and g[5].shape == (1, 8, 8) and g.stats["max"] == 3


def test_int8_calibration_reads_calib_batches_from_train(guarded, tiny_pair):
    from distill.quantize.pipeline import prepare, run_policy
    data, stats = guarded
    q = QuantizationConfig(calib_batches=CALIB_BATCHES, calib_batch_size=CALIB_BS)
    scorer = prepare(_model(tiny_pair), data, q, seed=0, batch_size=EVAL_BS)
    # calibration: exactly calib_batches × calib_batch_size train images, a batch per read
    assert stats["train"]["total"] == CALIB_BATCHES * CALIB_BS
    assert stats["train"]["max"] == CALIB_BS
    run_policy(scorer, "auto", 0.5)
    scorer.sensitivity()
    _bounded(stats["val"], EVAL_BS)          # every variant scored batch by batch


def test_qat_streams_train_and_val_by_batches(guarded, tiny_pair, tmp_path):
    from distill.quantize.calibrators import calibrate, calibration_indices
    from distill.quantize.qat import run_qat
    data, stats = guarded
    model = _model(tiny_pair)
    recipe = _recipe(str(tmp_path), qat={"epochs": 1, "lr": 0.001})
    idx = calibration_indices(len(data.train), CALIB_BATCHES * CALIB_BS, 0)
    thresholds = calibrate(model, data.train.x, "naive", CALIB_BS, idx=idx)
    # the model itself as the fp32 teacher: its logits are cached over train, batch by batch
    res = run_qat(model, thresholds, [], data, recipe, str(tmp_path / "qat"),
                  teacher_prefix=RunFolder(tiny_pair[0]).model_prefix, log=lambda *a: None)
    assert res.section["epochs"] == 1
    _bounded(stats["train"], max(EVAL_BS, 32))
    _bounded(stats["val"], EVAL_BS)


def test_channel_pruning_probe_reads_bounded_samples(guarded, tiny_pair, tmp_path):
    from distill.pruning.base import CRITERIA
    from distill.pruning.graph import analyze
    from distill.pruning.plan import choose_removed, unit_scores
    from distill.pruning.probe import Probe
    from distill.pruning.sensitivity import _grads
    data, stats = guarded
    _, sym, params = tiny_pair
    graph = analyze(sym, (1, 1, 8, 8), "data")
    names = sorted({s.param for s in graph.slices})
    grads = _grads(sym, params, "data", data, names, batches=2, batch_size=32)      # taylor's pass
    assert stats["train"]["total"] == 64 and stats["train"]["max"] == 32
    scores = unit_scores(graph, graph.groups, CRITERIA.get("l1")(),
                         {k: v.asnumpy() for k, v in params.items()}, grads)
    probe = Probe(graph, params, "data", data, 1, 1, EVAL_BS, str(tmp_path), recover_steps=2,
                  eval_limit=100, symbol=sym, bn_batches=2)
    removed = choose_removed(graph, scores, {graph.groups[0].id: 0.5}, round_to=2)
    assert removed
    probe.measure(removed, time=False, fidelity=True)
    probe.measure(removed, time=False, fidelity=True)
    _bounded(stats["train"], BATCH)
    # BN images (2 × 64) once, fidelity (up to 1,024) per variant and the reference, KD steps
    assert stats["train"]["total"] <= 64 + 2 * 64 + 3 * 1024 + 2 * 2 * 32
    _bounded(stats["val"], EVAL_BS)
    assert stats["val"]["total"] <= 2 * 100 + 2          # eval_limit per variant, 1 image per export


def test_export_checks_read_the_test_split_in_batches(guarded, tiny_pair, monkeypatch):
    from distill.export import ExportOptions, export_run
    from distill.export import core, ncnn_worker
    from distill.export.core import available_formats
    data, stats = guarded
    monkeypatch.setattr(core, "load_data", lambda cfg, seed: data)
    # ship the test split to the runtimes in several chunks (120 images each)
    monkeypatch.setattr(ncnn_worker, "CHUNK_BYTES", 120 * 8 * 8 * 4)
    sent, run_tasks = [], ncnn_worker.run_tasks

    def recording(tasks, arrays, work_dir, **kw):
        sent.append(max(len(a) for a in arrays.values()) if arrays else 0)
        return run_tasks(tasks, arrays, work_dir, **kw)
    monkeypatch.setattr(ncnn_worker, "run_tasks", recording)
    avail = available_formats()
    formats = [f for f in ("mxnet", "onnx", "onnx-int8", "ncnn", "ncnn-int8") if avail.get(f) is None]
    assert "onnx" in formats
    card = export_run(tiny_pair[0], formats=formats,
                      options=ExportOptions(latency=False, eval_batch_size=EVAL_BS),
                      raise_on_failure=False)
    for name in formats:
        entry = card["exports"][name]
        assert entry["check"]["passed"] or "int8" in name, (name, entry["check"])
        if entry.get("parity"):
            assert entry["parity"]["images"] == len(data.val)     # the whole split, streamed
    assert sent and max(sent) <= max(120, CALIB_BATCHES * CALIB_BS)    # never the whole split
    _bounded(stats["val"], EVAL_BS)
    _bounded(stats["train"], max(CALIB_BS, 32))
    if "onnx-int8" in formats or "ncnn-int8" in formats:
        # the calibration sample, read once for the thresholds and once for the PNGs
        assert stats["train"]["total"] <= 2 * CALIB_BATCHES * CALIB_BS


def test_compare_predictions_stream_the_val_split(guarded, tiny_pair, tmp_path, monkeypatch):
    import distill.data
    from distill.compare.predictions import run_predictions
    data, stats = guarded
    monkeypatch.setattr(distill.data, "load_data", lambda cfg, seed: data)
    pred, labels = run_predictions(RunFolder(tiny_pair[0]), False, str(tmp_path), log=lambda *a: None)
    assert len(pred) == len(labels) == len(data.val)
    _bounded(stats["val"], EVAL_BS)
    assert stats["val"]["total"] == len(data.val)


def test_teacher_cache_is_filled_batch_by_batch(guarded, tiny_pair):
    from distill.graphio import load_symbol_block
    from distill.teacher_cache import TeacherOutputs
    data, stats = guarded
    net = load_symbol_block(RunFolder(tiny_pair[0]).model_prefix)
    teacher = SimpleNamespace(outputs=lambda x: [net(x)])
    cache = TeacherOutputs(teacher, data.train.x, "memory", batch_size=EVAL_BS, progress=False)
    _bounded(stats["train"], EVAL_BS)
    assert stats["train"]["total"] == len(data.train) + 2        # + the 2 images that size it
    idx = np.array([5, 1, 900])
    want = net(mx.nd.array(np.asarray(data.train.x._x[idx]))).asnumpy()
    np.testing.assert_allclose(cache(idx, None)[0].asnumpy(), want, rtol=1e-5, atol=1e-5)
