"""Streamed ``recordio``/``image_folder`` data (distill.data.stream): the same pixels as in
memory, deterministic per-record augmentation, metadata and corrupt records, shards, and the
bound on what a consumer may hold."""
import logging
import os
import struct
import threading

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from distill.data import DataBundle, load_data
from distill.data import augment as A
from distill.data.recordio import RecordFile
from distill.data.stream import (MAX_IN_MEMORY, StreamedImages, TransformSpec, decode_throughput)
from distill.errors import UserError
from distill.recipe import DataConfig, LossTerm, TrainerConfig

ALL_AUG = ["random_resized_crop", "crop", "hflip", "color_jitter", "lighting"]


# -- writers ------------------------------------------------------------------------------------

def _photo(i, h=20, w=26, gray=False):
    """A smooth, image-like uint8 picture that differs with ``i``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([np.sin(xx / (2 + i % 5) + i), np.cos(yy / (3 + i % 3)), np.sin((xx + yy) / 7 + i)], -1)
    img = ((rgb * 0.5 + 0.5) * 230 + 10).astype(np.uint8)
    return img[:, :, 0] if gray else img


def write_rec(prefix, records, idx=True):
    """``records``: list of ``(flag, label, payload_bytes)``; PREFIX.rec (+ .idx with keys 0..)."""
    prefix = str(prefix)
    w = (mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") if idx
         else mx.recordio.MXRecordIO(prefix + ".rec", "w"))
    for i, (flag, label, payload) in enumerate(records):
        s = mx.recordio.pack(mx.recordio.IRHeader(flag, label, i, 0), payload)
        w.write_idx(i, s) if idx else w.write(s)
    w.close()
    return prefix


def _img_bytes(img, fmt=".jpg"):
    return mx.recordio.pack_img(mx.recordio.IRHeader(0, 0.0, 0, 0), img, quality=90,
                                img_fmt=fmt)[24:]


def photo_rec(prefix, n, classes=4, sizes=((20, 26), (24, 18), (22, 22)), idx=True):
    recs = [(0, float(i % classes), _img_bytes(_photo(i, *sizes[i % len(sizes)])))
            for i in range(n)]
    return write_rec(prefix, recs, idx)


def photo_folder(root, classes=("a", "b", "c"), per=5):
    for k, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per):
            h, w = (18, 24) if i % 2 else (21, 17)
            Image.fromarray(_photo(7 * k + i, h, w)).save(root / c / f"{i}.png")
    return str(root)


def _arr(x):
    return np.asarray(x)


# -- the same pixels as in memory -----------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"grayscale": True}, {"val_resize": 20}])
def test_streamed_recordio_equals_in_memory(tmp_path, extra):
    p = photo_rec(tmp_path / "r", 24)
    c = 1 if extra.get("grayscale") else 3
    cfg = dict(name="recordio", root=p, image_size=[16, 14], mean=[0.4, 0.5, 0.6][:c],
               std=[0.2, 0.3, 0.25][:c], **extra)
    s = load_data(DataConfig(**cfg), seed=3)
    m = load_data(DataConfig(**cfg, stream=False), seed=3)
    assert s.train.x.is_streamed and isinstance(m.train.x, np.ndarray)
    assert s.train.x.shape == m.train.x.shape and s.val.x.shape == m.val.x.shape
    np.testing.assert_array_equal(s.train.y, m.train.y)
    idx = np.array([5, 0, 3, 3, len(s.train) - 1])
    np.testing.assert_array_equal(s.train.x[idx], m.train.x[idx])          # bit-identical
    np.testing.assert_array_equal(_arr(s.val.x), m.val.x)
    np.testing.assert_array_equal(s.train.x[2], m.train.x[2])
    np.testing.assert_array_equal(s.train.x[-1:], m.train.x[-1:])
    mask = s.train.y == 1
    np.testing.assert_array_equal(s.train.x[mask], m.train.x[mask])
    assert s.train.x[idx].flags["C_CONTIGUOUS"] and s.train.x[idx].dtype == np.float32


def test_streamed_folder_equals_in_memory(tmp_path):
    root = photo_folder(tmp_path / "f")
    for extra in ({"image_size": [12, 10]}, {"image_size": 16, "grayscale": True, "val_resize": 18}):
        s = load_data(DataConfig(name="image_folder", root=root, val_split=0.4, **extra), seed=1)
        m = load_data(DataConfig(name="image_folder", root=root, val_split=0.4, stream=False, **extra),
                      seed=1)
        assert s.channels == m.channels and s.image_size == m.image_size
        np.testing.assert_array_equal(_arr(s.train.x), m.train.x)
        np.testing.assert_array_equal(_arr(s.val.x), m.val.x)
        np.testing.assert_array_equal(s.val.y, m.val.y)
        assert sorted(np.concatenate([s.train.x.record_ids, s.val.x.record_ids]).tolist()) == list(range(15))


def test_val_resize_is_resize_short_then_centre_crop():
    from distill.data.images import eval_resize
    x = np.random.RandomState(0).rand(1, 30, 40).astype(np.float32)
    out = eval_resize(x, (16, 16), val_resize=20)      # 30×40 → 20×26, centre 16×16
    ref = mx.image.center_crop(mx.image.resize_short(mx.nd.array(x.transpose(1, 2, 0)), 20, interp=1),
                               (16, 16))[0].asnumpy()
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out[0], ref[:, :, 0], atol=2e-3)


# -- batch(): deterministic per-record augmentation ----------------------------------------------

@pytest.fixture(scope="module")
def rec_bundle(tmp_path_factory):
    p = photo_rec(tmp_path_factory.mktemp("rb") / "r", 32)
    return load_data(DataConfig(name="recordio", root=p, image_size=16, mean=[0.5], std=[0.25],
                                augment=ALL_AUG), seed=0)


def test_batch_deterministic_whatever_the_threads(rec_bundle):
    x = rec_bundle.train.x
    idx = np.array([4, 1, 7, 0, 9, 2, 3, 8])
    ref, ok = x.with_spec(workers=0).batch(idx, ALL_AUG, seed=11)
    assert ok.all() and ref.shape == (8, 3, 16, 16) and ref.dtype == np.float32
    for w in (1, 4):
        again, _ = x.with_spec(workers=w).batch(idx, ALL_AUG, seed=11)
        np.testing.assert_array_equal(again, ref)
    # a row depends on (seed, record id) only, not on the batch it is in or its place there
    rev, _ = x.with_spec(workers=4).batch(idx[::-1], ALL_AUG, seed=11)
    np.testing.assert_array_equal(rev[::-1], ref)
    one, _ = x.batch(idx[2:3], ALL_AUG, seed=11)
    np.testing.assert_array_equal(one[0], ref[2])
    other, _ = x.batch(idx, ALL_AUG, seed=12)
    assert all(not np.array_equal(other[i], ref[i]) for i in range(len(idx)))
    plain, _ = x.batch(idx, [], seed=11)
    np.testing.assert_array_equal(plain, x[idx])            # no augmentation: the eval view
    # concurrent readers from several threads see the same pixels
    results = [None] * 4

    def read(k):
        results[k] = x.with_spec(workers=2).batch(idx, ALL_AUG, seed=11)[0]
    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in results:
        np.testing.assert_array_equal(r, ref)


@pytest.mark.parametrize("op", ALL_AUG)
def test_each_augmentation_is_sane(rec_bundle, op):
    x = rec_bundle.train.x
    idx = np.arange(12)
    plain = x[idx]
    out, ok = x.batch(idx, [op], seed=5)
    assert ok.all() and out.shape == plain.shape and np.isfinite(out).all()
    unit = out * 0.25 + 0.5                                    # back to [0, 1]
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    changed = [not np.array_equal(out[i], plain[i]) for i in range(12)]
    assert sum(changed) >= (4 if op == "hflip" else 8)         # flips half, on average
    if op == "hflip":
        for i in range(12):
            assert np.array_equal(out[i], plain[i]) or np.array_equal(out[i], plain[i][:, :, ::-1])
    if op in ("color_jitter", "lighting"):                      # colour only: same geometry
        c = [np.corrcoef(out[i].ravel(), plain[i].ravel())[0, 1] for i in range(12)]
        assert min(c) > 0.8


def test_augment_functions():
    rng = np.random.RandomState(0)
    img = np.random.RandomState(1).rand(30, 40, 3).astype(np.float32)
    # area 1 and aspect fixed to the image's: the crop is the whole image
    for _ in range(5):
        assert A.random_resized_crop_box(30, 40, rng, 1.0, ratio=(4 / 3, 4 / 3)) == (0, 0, 30, 40)
    np.testing.assert_array_equal(A.random_resized_crop(img, (30, 40), rng, 1.0, (4 / 3, 4 / 3)), img)
    boxes = [A.random_resized_crop_box(30, 40, rng, 0.08) for _ in range(200)]
    areas = np.array([ch * cw / 1200 for _, _, ch, cw in boxes])
    assert 0.05 < areas.min() and areas.max() <= 1.0 and 0.35 < areas.mean() < 0.7
    assert all(0 <= y0 and y0 + ch <= 30 and 0 <= x0 and x0 + cw <= 40 for y0, x0, ch, cw in boxes)
    # impossible tries (a 1-pixel-wide image, wide aspect): MXNet's centre-crop fallback
    assert A.random_resized_crop_box(50, 1, rng, 0.9, size=(10, 1)) == (20, 0, 10, 1)
    # jitter 0 and pca 0 are the identity; the outputs stay in [0, 1]
    np.testing.assert_allclose(A.color_jitter(img, rng, 0, 0, 0), img)
    assert A.lighting(img, rng, 0.0) is img
    j = A.color_jitter(img, rng, 0.9, 0.9, 0.9)
    assert j.dtype == np.float32 and j.min() >= 0 and j.max() <= 1
    light = A.lighting(np.full((4, 4, 3), 0.5, np.float32), np.random.RandomState(3), 0.1)
    shift = light[0, 0] - 0.5                                   # one RGB offset for every pixel
    np.testing.assert_allclose(light, np.broadcast_to(0.5 + shift, light.shape), atol=1e-6)
    alpha = np.random.RandomState(3).normal(0, 0.1, 3)
    np.testing.assert_allclose(shift, (A.IMAGENET_EIGVEC * alpha) @ A.IMAGENET_EIGVAL / 255, atol=1e-6)
    assert A.pad_crop(img, rng).shape == img.shape and A.hflip(img, rng).shape == img.shape


# -- insightface metadata, corrupt records, missing .idx -------------------------------------------

def _insightface_rec(prefix, idx=True):
    """Header record 0 (flag 2, empty), 3 identity records (flag 2, empty), 9 images (one corrupt)."""
    recs = [(2, [1.0, 10.0], b"")]                       # label = (first identity record, end)
    imgs = [(0, float(i // 3), _img_bytes(_photo(i), ".png")) for i in range(9)]
    imgs[4] = (0, 1.0, b"\xff\xd8 not a jpeg at all")
    recs += imgs
    recs += [(2, [float(1 + 3 * k), float(4 + 3 * k)], b"") for k in range(3)]
    return write_rec(prefix, recs, idx)          # mx.recordio.pack takes the label list when flag > 0


def test_insightface_metadata_and_corrupt_record(tmp_path, caplog):
    p = _insightface_rec(tmp_path / "faces")
    with caplog.at_level(logging.INFO, logger="distill.data"):
        b = load_data(DataConfig(name="recordio", root=p, val_split=0.34), seed=0)
    meta = [r for r in caplog.records if "metadata" in r.getMessage()]
    assert len(meta) == 1 and "4 metadata record(s)" in meta[0].getMessage()
    assert b.num_classes == 3 and len(b.train) + len(b.val) == 9 and b.skipped == 0
    ids = sorted(np.concatenate([b.train.x.record_ids, b.val.x.record_ids]).tolist())
    assert ids == list(range(1, 10))                         # record keys; 0 and 10..12 are metadata
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        for _ in range(2):                                   # read twice, counted and logged once
            xs = [_arr(b.train.x), _arr(b.val.x)]
    assert b.skipped == 1 and b.skipped_count() == 1
    said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(said) == 1 and "faces.rec record 5" in said[0]
    x = np.concatenate(xs)
    ids = np.concatenate([b.train.x.record_ids, b.val.x.record_ids])
    assert (x[ids == 5] == 0).all() and (x[ids != 5].reshape(8, -1).max(1) > 0).all()
    xb, ok = b.train.x.batch(np.arange(len(b.train)), ["hflip"], seed=0)
    assert ok.tolist() == (b.train.x.record_ids != 5).tolist() and (xb[~ok] == 0).all()
    strict = load_data(DataConfig(name="recordio", root=p, val_split=0.34, skip_corrupt=False), seed=0)
    with pytest.raises(UserError, match=r"faces\.rec record 5.*`data\.skip_corrupt: true`"):
        np.concatenate([strict.train.x, strict.val.x])
    # in memory: the same metadata handling, the corrupt record left out as before
    m = load_data(DataConfig(name="recordio", root=p, val_split=0.34, stream=False), seed=0)
    assert m.skipped == 1 and len(m.train) + len(m.val) == 8 and m.num_classes == 3


def test_rec_without_idx_and_split_records(tmp_path, caplog):
    """Indexed by a scan (nothing written anywhere near the .rec); a record whose data holds
    the RecordIO magic is split in parts by MXNet's writer and still read whole."""
    magic = struct.pack("<I", 0xCED7230A)
    png = _img_bytes(_photo(3), ".png")
    odd = png + b"\0" * ((-len(png) - 24) % 4) + magic + b"tail" + magic + b"end!"  # after IEND
    recs = [(0, float(i % 2), _img_bytes(_photo(i), ".png")) for i in range(6)]
    recs[3] = (0, 1.0, odd)
    with_idx = write_rec(tmp_path / "a" / "r", recs) if os.makedirs(tmp_path / "a") is None else None
    no_idx = write_rec(tmp_path / "b" / "r", recs, idx=False) if os.makedirs(tmp_path / "b") is None else None
    before = sorted(os.listdir(tmp_path / "b"))
    fa, fb = RecordFile(with_idx + ".rec", with_idx + ".idx"), RecordFile(no_idx + ".rec")
    assert fb._multi.sum() == 1 and fb._multi[3]
    np.testing.assert_array_equal(fa.offsets, fb.offsets)
    reader = mx.recordio.MXIndexedRecordIO(with_idx + ".idx", with_idx + ".rec", "r")
    for i in range(6):
        assert fb.payload(i) == mx.recordio.unpack(reader.read_idx(i))[1]
    reader.close()
    with caplog.at_level(logging.INFO, logger="distill.data"):
        a = load_data(DataConfig(name="recordio", root=with_idx, image_size=12), seed=0)
        b = load_data(DataConfig(name="recordio", root=no_idx, image_size=12), seed=0)
    assert "has no .idx" in caplog.text and "nothing written" in caplog.text
    np.testing.assert_array_equal(_arr(a.train.x), _arr(b.train.x))
    assert b.skipped == 0 and sorted(os.listdir(tmp_path / "b")) == before


# -- limit, val_split, shards on record indices ----------------------------------------------------

def test_limit_val_split_and_parts_on_records(tmp_path):
    p = photo_rec(tmp_path / "r", 40, classes=4, sizes=((8, 8),))
    base = dict(name="recordio", root=p, image_size=8, val_split=0.25)
    whole = load_data(DataConfig(**base), seed=2)
    mem = load_data(DataConfig(**base, stream=False), seed=2)
    assert (len(whole.train), len(whole.val)) == (32, 8) == (len(mem.train), len(mem.val))
    assert np.bincount(whole.val.y).tolist() == [2] * 4              # stratified, round(2.5) = 2
    assert not set(whole.train.x.record_ids) & set(whole.val.x.record_ids)
    lim = load_data(DataConfig(**base, limit=12), seed=2)
    assert len(lim.train) == 12 and np.bincount(lim.train.y).tolist() == [3] * 4
    assert set(lim.train.x.record_ids) <= set(whole.train.x.record_ids)
    np.testing.assert_array_equal(_arr(lim.train.x), load_data(DataConfig(**base, limit=12, stream=False),
                                                               seed=2).train.x)
    parts = [load_data(DataConfig(**base), seed=2, part_index=k, num_parts=2) for k in range(2)]
    ids = [set(q.train.x.record_ids.tolist()) for q in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(whole.train.x.record_ids.tolist())
    assert max(ids[0]) < min(ids[1])                          # contiguous runs of records
    for k, q in enumerate(parts):
        ref = load_data(DataConfig(**base, stream=False), seed=2, part_index=k, num_parts=2)
        np.testing.assert_array_equal(_arr(q.train.x), ref.train.x)
        np.testing.assert_array_equal(q.train.y, ref.train.y)
        np.testing.assert_array_equal(_arr(q.val.x), _arr(whole.val.x))   # val whole everywhere


def test_folder_shards_disjoint(tmp_path):
    root = photo_folder(tmp_path / "f", per=6)
    base = dict(name="image_folder", root=root, image_size=8, val_split=0.34)
    whole = load_data(DataConfig(**base), seed=0)
    parts = [load_data(DataConfig(**base), seed=0, part_index=k, num_parts=2) for k in range(2)]
    ids = [set(q.train.x.record_ids.tolist()) for q in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] <= set(whole.train.x.record_ids.tolist())
    assert len(ids[0]) == len(ids[1]) == len(whole.train) // 2


# -- training: streamed and in-memory give the same parameters --------------------------------------

def test_fit_streamed_equals_in_memory(tmp_path):
    from mxnet import gluon
    from distill.losses import build_loss
    from distill.trainer import Term, fit
    root = photo_folder(tmp_path / "f", per=6)
    params = []
    for stream in (None, False):
        data = load_data(DataConfig(name="image_folder", root=root, image_size=12, mean=[0.5],
                                    std=[0.25], stream=stream), seed=0)
        assert getattr(data.train.x, "is_streamed", False) == (stream is None)
        mx.random.seed(0)
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(4, 3, padding=1, activation="relu"), gluon.nn.GlobalAvgPool2D(),
                gluon.nn.Dense(3))
        net.initialize(mx.init.Xavier(rnd_type="uniform"), ctx=mx.cpu())
        ce = build_loss(LossTerm(loss="ce"))
        ce.initialize(ctx=mx.cpu())
        cfg = TrainerConfig(epochs=1, batch_size=4, lr=0.1, progress=False)
        out = fit(net, net, None, data, [Term("ce", 1.0, ce)], cfg, log=lambda *a: None)
        assert len(out["history"]) == 1
        params.append({k: v.data().asnumpy() for k, v in net.collect_params().items()})
    a, b = params
    assert [k.split("_", 1)[1] for k in a] == [k.split("_", 1)[1] for k in b]
    for va, vb in zip(a.values(), b.values()):
        np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6)


# -- bounded memory, bookkeeping ---------------------------------------------------------------------

def test_asarray_refused_above_the_bound(tmp_path):
    tiny = _img_bytes(np.full((4, 4), 7, np.uint8), ".png")
    p = write_rec(tmp_path / "big", [(0, float(i % 2), tiny) for i in range(MAX_IN_MEMORY + 40)])
    b = load_data(DataConfig(name="recordio", root=p, image_size=4, grayscale=True, val_split=0.005), seed=0)
    assert len(b.train) > MAX_IN_MEMORY and b.train.x.shape == (len(b.train), 1, 4, 4)
    with pytest.raises(RuntimeError, match="hold the whole streamed recordio split"):
        np.asarray(b.train.x)
    assert b.train.x[np.arange(3)].shape == (3, 1, 4, 4)          # batches are fine
    assert np.asarray(b.val.x).shape == (len(b.val), 1, 4, 4)     # and a small split
    np.testing.assert_allclose(b.train.x.subset(np.arange(5))[:], 7 / 255, atol=1e-6)
    assert decode_throughput(b.train.x, 0, n=64) > 0


def test_views_and_indexing(rec_bundle):
    x = rec_bundle.train.x
    assert x.ndim == 4 and x.dtype == np.float32 and len(x) == x.shape[0] and x.is_streamed
    sub = x.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub[:], x[np.array([3, 1])])
    np.testing.assert_array_equal(sub.record_ids, x.record_ids[[3, 1]])
    assert sub.source is x.source                               # one unreadable-image count
    np.testing.assert_array_equal(x[1, 0], x[1][0])
    np.testing.assert_array_equal(x[[1, 2], :, 0], x[[1, 2]][:, :, 0])
    with pytest.raises(IndexError):
        x[len(x)]
    assert x[np.zeros(0, int)].shape == (0,) + x.shape[1:]


def test_stream_true_on_bundled_set_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        b = load_data(DataConfig(name="digits", stream=True))
    assert isinstance(b.train.x, np.ndarray) and "held in memory anyway" in caplog.text


def test_databundle_skipped_still_settable():
    x = np.zeros((1, 1, 2, 2), np.float32)
    from distill.data import Split
    b = DataBundle("d", Split(x, None), Split(x, None), 2, 1, (2, 2), ["a", "b"], [0.0], [1.0], "s",
                   skipped=3)
    assert b.skipped == 3 == b.skipped_count()
    spec = TransformSpec(channels=1, size=(2, 2))
    assert StreamedImages(None, np.arange(0), spec).shape == (0, 1, 2, 2)


def test_streamed_split_pickles(rec_bundle):
    import pickle
    x = rec_bundle.train.x
    y = pickle.loads(pickle.dumps(x.subset(np.arange(4))))
    np.testing.assert_array_equal(y.batch(np.arange(4), ALL_AUG, 3)[0], x.batch(np.arange(4), ALL_AUG, 3)[0])


def test_train_py_on_an_insightface_rec_with_a_corrupt_record(tmp_path):
    """The whole path on a face-style .rec: metadata records left out and said once, the corrupt
    record dropped from its batch and counted in the log and metrics.json."""
    import json
    import yaml
    from helpers import run_cli
    p = _insightface_rec(tmp_path / "faces")
    recipe = {"name": "faces", "data": {"name": "recordio", "root": p, "val_split": 0.34,
                                        "image_size": 16, "workers": 2},
              "student": {"model": "mobilenet0.25"}, "distillation": [{"loss": "ce", "weight": 1.0}],
              "trainer": {"epochs": 1, "batch_size": 3, "lr": 0.01, "progress": False},
              "output": {"dir": str(tmp_path / "run"), "latency": False}}
    path = tmp_path / "faces.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli(str(path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("4 metadata record(s)") == 1
    assert "faces.rec record 5" in out and "unreadable" in out
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    assert m["data"]["unreadable_skipped"] == 1
    assert m["data"]["train"] + m["data"]["val"] == 9
