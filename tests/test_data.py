"""Tests for distill.data: every registered dataset, the common steps, and the file errors."""
import logging
import os

import cv2
import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from distill.data import (DATASETS, DataBundle, balanced_subset, load_data, per_channel,
                          stratified_split)
from distill.errors import UserError
from distill.recipe import DataConfig
from helpers import write_fashion


# -- fixtures: tiny datasets written to tmp_path --------------------------------------------------


def _gray(value, size=(10, 12)):
    return Image.fromarray(np.full(size, value, np.uint8), mode="L")


def _rgb(rgb, size=(10, 12)):
    return Image.fromarray(np.tile(np.array(rgb, np.uint8), size + (1,)), mode="RGB")


def write_folder(root, classes, per_class=4, make=None, ext="png"):
    """root/<class>/<i>.png; class k's images have gray value 40*k + i (or ``make(k, i)``)."""
    for k, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make(k, i) if make else _gray(40 * k + i)
            img.save(d / f"{i}.{ext}")
    return root


def write_rec(prefix, labels, make=None, fmt=".png"):
    """PREFIX.rec/.idx with one image per label; image i is gray 10*i unless ``make(i)``."""
    w = mx.recordio.MXIndexedRecordIO(str(prefix) + ".idx", str(prefix) + ".rec", "w")
    for i, lab in enumerate(labels):
        img = make(i) if make else np.full((6, 7), 10 * i, np.uint8)
        w.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(lab), i, 0), img,
                                            img_fmt=fmt, quality=3 if fmt == ".png" else 95))
    w.close()
    return str(prefix)


@pytest.fixture(scope="module")
def mnist():
    return load_data(DataConfig(name="mnist5k"), seed=0)


@pytest.fixture
def folder_root(tmp_path):
    return write_folder(tmp_path / "imgs", ["cat", "dog", "emu"], per_class=5)


@pytest.fixture
def rec_root(tmp_path):
    return write_rec(tmp_path / "data", [i % 3 for i in range(12)])


# -- every registered dataset ---------------------------------------------------------------------

# name -> (config factory, expected (channels, H, W), num_classes); a new dataset must be added here.
CASES = {
    "mnist5k": (lambda p: DataConfig(name="mnist5k"), (1, 28, 28), 10),
    "digits": (lambda p: DataConfig(name="digits"), (1, 8, 8), 10),
    "synthetic": (lambda p: DataConfig(name="synthetic", num_samples=60, num_classes=3, channels=3),
                  (3, 16, 16), 3),
    "image_folder": (lambda p: DataConfig(name="image_folder",
                                          root=str(write_folder(p / "f", ["a", "b"]))),
                     (1, 10, 12), 2),
    "recordio": (lambda p: DataConfig(name="recordio", root=write_rec(p / "r", [0, 1, 2, 3] * 3)),
                 (1, 6, 7), 4),
    "fashion_mnist": (lambda p: DataConfig(name="fashion_mnist",
                                           root=write_fashion(str(p / "fm"), n_train=100)),
                      (1, 28, 28), 10),
}


def test_every_dataset_has_a_case():
    assert sorted(CASES) == DATASETS.names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_dataset_shapes_and_dtypes(name, tmp_path):
    make, chw, k = CASES[name]
    b = load_data(make(tmp_path), seed=0)
    assert isinstance(b, DataBundle) and b.name == name
    for split in (b.train, b.val):
        # recordio/image_folder are streamed: x is array-like; np.asarray decodes (small sets)
        x = np.asarray(split.x)
        assert split.x.dtype == np.float32 and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
        assert split.x.shape[1:] == chw and x.shape == split.x.shape
        assert split.y.dtype == np.int32 and split.y.shape == (len(split.x),)
        assert 0 <= split.y.min() and split.y.max() < k
        assert 0.0 <= x.min() and x.max() <= 1.0   # mean 0 / std 1 by default
    assert (b.channels, *b.image_size) == chw
    assert b.num_classes == k == len(b.class_names)
    assert b.mean == [0.0] * chw[0] and b.std == [1.0] * chw[0]
    assert set(np.unique(b.train.y)) == set(range(k))
    assert b.calib_source.startswith(name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match=r"data\.name.*'mnist5k'.*Valid dataset names: digits"):
        load_data(DataConfig(name="mnist"))


# -- mnist5k / digits / synthetic -----------------------------------------------------------------

def test_mnist5k_fixed_split(mnist):
    assert (len(mnist.train), len(mnist.val)) == (4000, 1000)
    assert np.bincount(mnist.val.y).tolist() == [100] * 10
    assert np.bincount(mnist.train.y).tolist() == [400] * 10
    other = load_data(DataConfig(name="mnist5k"), seed=7)
    np.testing.assert_array_equal(other.val.x, mnist.val.x)
    np.testing.assert_array_equal(other.val.y, mnist.val.y)
    np.testing.assert_array_equal(other.train.y, mnist.train.y)
    # Train and val are disjoint images: no val image appears in train.
    tr = {row.tobytes() for row in mnist.train.x.reshape(4000, -1)}
    assert sum(row.tobytes() in tr for row in mnist.val.x.reshape(1000, -1)) == 0
    assert mnist.train.x.max() == 1.0 and mnist.class_names == [str(i) for i in range(10)]


def test_digits_scaled_and_split():
    b = load_data(DataConfig(name="digits"))
    assert len(b.train) + len(b.val) == 1797
    assert abs(len(b.val) / 1797 - 0.2) < 0.01
    assert b.train.x.max() == 1.0 and b.train.x.min() == 0.0
    # values were k/16 for integer k
    np.testing.assert_allclose(b.train.x * 16, np.round(b.train.x * 16), atol=1e-5)
    b30 = load_data(DataConfig(name="digits", val_split=0.3), seed=5)
    assert abs(len(b30.val) / 1797 - 0.3) < 0.01
    np.testing.assert_array_equal(load_data(DataConfig(name="digits", val_split=0.3), seed=9).val.x,
                                  b30.val.x)


def test_synthetic_deterministic_and_learnable():
    cfg = DataConfig(name="synthetic", num_samples=400, num_classes=5, channels=1, val_split=0.25)
    a, b, c = load_data(cfg, seed=3), load_data(cfg, seed=3), load_data(cfg, seed=4)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.val.y, b.val.y)
    assert not np.array_equal(a.train.x, c.train.x)
    assert (len(a.train), len(a.val)) == (300, 100)
    assert np.bincount(a.val.y).tolist() == [20] * 5
    # Nearest class mean from train already separates val almost perfectly.
    means = np.stack([a.train.x[a.train.y == k].mean(0) for k in range(5)]).reshape(5, -1)
    d = ((a.val.x.reshape(100, 1, -1) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == a.val.y).mean() >= 0.95


def test_synthetic_size_and_channels():
    b = load_data(DataConfig(name="synthetic", num_samples=20, num_classes=2, channels=3,
                             image_size=[8, 12]))
    assert b.train.x.shape[1:] == (3, 8, 12) and b.image_size == (8, 12)


# -- common steps ---------------------------------------------------------------------------------

def test_mean_std_applied(mnist):
    b = load_data(DataConfig(name="mnist5k", mean=[0.1307], std=[0.3081]))
    np.testing.assert_allclose(b.train.x, (mnist.train.x - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    assert np.isclose(b.train.x.min(), -0.1307 / 0.3081, atol=1e-5)
    assert b.mean == [0.1307] and b.std == [0.3081]


def test_mean_std_per_channel_and_broadcast():
    cfg = dict(name="synthetic", num_samples=40, num_classes=2, channels=3)
    raw = load_data(DataConfig(**cfg), seed=1).train.x
    b = load_data(DataConfig(**cfg, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0]), seed=1)
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 2.0)]):
        np.testing.assert_allclose(b.train.x[:, c], (raw[:, c] - m) / s, rtol=1e-5, atol=1e-6)
    one = load_data(DataConfig(**cfg, mean=[0.5], std=[0.5]), seed=1)
    np.testing.assert_allclose(one.train.x, raw * 2 - 1, atol=1e-6)
    assert one.mean == [0.5] * 3 and one.std == [0.5] * 3
    only_mean = load_data(DataConfig(**cfg, mean=[0.25]), seed=1)
    np.testing.assert_allclose(only_mean.train.x, raw - 0.25, atol=1e-6)


def test_mean_wrong_count_names_key():
    with pytest.raises(UserError, match=r"`data\.mean` has 2 values.*1 channel"):
        load_data(DataConfig(name="digits", mean=[0.1, 0.2], std=[1.0, 1.0]))
    with pytest.raises(UserError, match=r"`data\.std` has 2 values.*3 channel"):
        load_data(DataConfig(name="synthetic", num_samples=10, num_classes=2, channels=3,
                             std=[1.0, 2.0]))
    assert per_channel(None, 3, "k", 1.0) == [1.0, 1.0, 1.0]


def test_resize_bilinear():
    b = load_data(DataConfig(name="digits", image_size=16))
    assert b.train.x.shape[1:] == (1, 16, 16) and b.image_size == (16, 16)
    ref = load_data(DataConfig(name="digits"))
    expect = cv2.resize(ref.train.x[0, 0], (16, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(b.train.x[0, 0], expect, atol=1e-6)
    # Mean intensity survives a bilinear resize roughly.
    assert abs(b.train.x.mean() - ref.train.x.mean()) < 0.02
    rect = load_data(DataConfig(name="mnist5k", image_size=[20, 24], limit=10))
    assert rect.train.x.shape == (10, 1, 20, 24) and rect.val.x.shape == (1000, 1, 20, 24)


def test_grayscale_false_makes_three_equal_channels():
    b = load_data(DataConfig(name="digits", grayscale=False))
    assert b.channels == 3 and b.train.x.shape[1] == 3
    np.testing.assert_array_equal(b.train.x[:, 0], b.train.x[:, 2])


def test_limit_is_balanced_and_deterministic(mnist):
    b = load_data(DataConfig(name="mnist5k", limit=50))
    assert len(b.train) == 50 and np.bincount(b.train.y).tolist() == [5] * 10
    assert len(b.val) == 1000
    np.testing.assert_array_equal(b.train.x, load_data(DataConfig(name="mnist5k", limit=50)).train.x)
    # The subset is made of real train images, in their original order.
    keep = balanced_subset(mnist.train.y, 50)
    np.testing.assert_array_equal(b.train.x, mnist.train.x[keep])
    assert "limited to 50" in b.calib_source
    assert balanced_subset(np.array([0, 0, 0, 1]), 3).tolist() == [0, 1, 3]


def test_labels_false_drops_train_labels_only():
    b = load_data(DataConfig(name="digits", labels=False))
    assert b.train.y is None and b.val.y is not None and b.val.y.dtype == np.int32


def test_stratified_split_properties():
    y = np.repeat(np.arange(4), [10, 5, 2, 1])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert np.bincount(y[va], minlength=4).tolist() == [2, 1, 1, 0]
    np.testing.assert_array_equal(stratified_split(y, 0.2, seed=0)[1], va)


# -- image_folder -----------------------------------------------------------------------------------

def test_image_folder_split_ratio_layout(folder_root):
    b = load_data(DataConfig(name="image_folder", root=str(folder_root), val_split=0.4), seed=0)
    assert b.class_names == ["cat", "dog", "emu"] and b.num_classes == 3
    assert (len(b.train), len(b.val)) == (9, 6)
    assert np.bincount(b.val.y).tolist() == [2, 2, 2]
    assert b.channels == 1 and b.image_size == (10, 12)
    # Pixel values come through exactly: class k, image i has gray 40*k + i.
    vals = np.round(np.concatenate([b.train.x, b.val.x])[:, 0, 0, 0] * 255).astype(int)
    ys = np.concatenate([b.train.y, b.val.y])
    assert sorted(vals.tolist()) == sorted(40 * k + i for k in range(3) for i in range(5))
    assert all(v // 40 == y for v, y in zip(vals, ys))
    other = load_data(DataConfig(name="image_folder", root=str(folder_root), val_split=0.4), seed=1)
    assert not np.array_equal(other.val.x, b.val.x)   # split follows the seed


def test_image_folder_train_val_layout(tmp_path):
    write_folder(tmp_path / "train", ["a", "b"], per_class=3)
    write_folder(tmp_path / "val", ["a", "b"], per_class=2)
    b = load_data(DataConfig(name="image_folder", root=str(tmp_path)))
    assert (len(b.train), len(b.val)) == (6, 4)
    assert b.val.y.tolist() == [0, 0, 1, 1]
    assert str(tmp_path / "train") in b.calib_source
    explicit = load_data(DataConfig(name="image_folder", train=str(tmp_path / "train"),
                                    val=str(tmp_path / "val")))
    np.testing.assert_array_equal(explicit.val.x, b.val.x)


def test_image_folder_rgb_and_grayscale(tmp_path):
    colors = [(0, 0, 255), (255, 0, 0)]                 # labels follow sorted names: blue=0
    root = write_folder(tmp_path / "rgb", ["blue", "red"], per_class=3,
                        make=lambda k, i: _rgb(colors[k]))
    b = load_data(DataConfig(name="image_folder", root=str(root)))
    assert b.channels == 3 and b.train.x.shape[1:] == (3, 10, 12)
    assert b.class_names == ["blue", "red"]
    red = b.train.x[b.train.y == 1][0]
    np.testing.assert_allclose(red[:, 0, 0], [1.0, 0.0, 0.0])            # RGB order, not BGR
    g = load_data(DataConfig(name="image_folder", root=str(root), grayscale=True))
    assert g.channels == 1
    np.testing.assert_allclose(g.train.x[g.train.y == 1][0, 0, 0, 0], 0.299, atol=1e-3)
    np.testing.assert_allclose(g.train.x[g.train.y == 0][0, 0, 0, 0], 0.114, atol=1e-3)
    # Mixed gray + RGB folders: auto picks 3 channels; gray images are repeated.
    _gray(100).save(root / "red" / "gray.png")
    m = load_data(DataConfig(name="image_folder", root=str(root), val_split=0.5))
    assert m.channels == 3
    x = np.concatenate([m.train.x, m.val.x])
    assert np.isclose(x[:, :, 0, 0], 100 / 255).all(axis=1).sum() == 1


def test_image_folder_gray_forced_to_rgb(folder_root):
    b = load_data(DataConfig(name="image_folder", root=str(folder_root), grayscale=False))
    assert b.channels == 3
    np.testing.assert_array_equal(b.train.x[:, 0], b.train.x[:, 1])


def test_image_folder_sizes(tmp_path):
    root = write_folder(tmp_path / "d", ["a", "b"], per_class=2)
    _gray(7, size=(20, 20)).save(root / "b" / "big.png")
    with pytest.raises(UserError, match=r"different sizes.*10×12.*big\.png is 20×20.*data\.image_size"):
        load_data(DataConfig(name="image_folder", root=str(root)))
    b = load_data(DataConfig(name="image_folder", root=str(root), image_size=[8, 6]))
    assert b.train.x.shape[1:] == (1, 8, 6) and b.val.x.shape[1:] == (1, 8, 6)


def test_image_folder_corrupt_skipped_or_rejected(folder_root, caplog):
    (folder_root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder_root / "emu" / "notes.txt").write_text("hello")
    (folder_root / "emu" / ".DS_Store").write_bytes(b"\0\0")           # hidden: ignored
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        b = load_data(DataConfig(name="image_folder", root=str(folder_root)))
    assert b.skipped == 2 and len(b.train) + len(b.val) == 15
    assert "skipped 2 unreadable" in caplog.text and "broken.png" in caplog.text
    with pytest.raises(UserError, match=r"cannot read .*broken\.png.*skip_corrupt"):
        load_data(DataConfig(name="image_folder", root=str(folder_root), skip_corrupt=False))


def test_image_folder_truncated_png_is_corrupt(folder_root):
    good = (folder_root / "cat" / "0.png").read_bytes()
    (folder_root / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    b = load_data(DataConfig(name="image_folder", root=str(folder_root)))
    assert b.skipped == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"`data\.root` .*nope does not exist"):
        load_data(DataConfig(name="image_folder", root=str(tmp_path / "nope")))
    with pytest.raises(UserError, match=r"set `data\.root`"):
        load_data(DataConfig(name="image_folder"))
    flat = tmp_path / "flat"
    flat.mkdir()
    _gray(1).save(flat / "x.png")
    with pytest.raises(UserError, match=r"flat has no class subfolders"):
        load_data(DataConfig(name="image_folder", root=str(flat)))
    root = write_folder(tmp_path / "e", ["a", "b"], per_class=2)
    (root / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*e[/\\]c is empty"):
        load_data(DataConfig(name="image_folder", root=str(root)))
    # A class whose every file is unreadable is as empty as an empty one.
    (root / "c" / "bad.png").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"class folder .*e[/\\]c has no readable images"):
        load_data(DataConfig(name="image_folder", root=str(root)))


def test_image_folder_train_val_class_mismatch(tmp_path):
    write_folder(tmp_path / "train", ["a", "b", "c"], per_class=2)
    write_folder(tmp_path / "val", ["a", "b", "d"], per_class=2)
    with pytest.raises(UserError, match=r"different classes.*only in .*train: c.*only in .*val: d"):
        load_data(DataConfig(name="image_folder", root=str(tmp_path)))


# -- recordio ---------------------------------------------------------------------------------------

def test_recordio_round_trip_prefix(rec_root):
    b = load_data(DataConfig(name="recordio", root=rec_root, val_split=0.25), seed=0)
    assert (len(b.train), len(b.val)) == (9, 3)
    assert b.num_classes == 3 and b.class_names == ["0", "1", "2"]
    assert b.channels == 1 and b.image_size == (6, 7)
    # PNG is lossless: image i is gray 10*i with label i % 3.
    x = np.concatenate([b.train.x, b.val.x])[:, 0]
    y = np.concatenate([b.train.y, b.val.y])
    ids = np.round(x[:, 0, 0] * 255 / 10).astype(int)
    assert sorted(ids.tolist()) == list(range(12))
    assert (ids % 3 == y).all()
    assert np.allclose(x, x[:, :1, :1])                # each image is flat
    same = load_data(DataConfig(name="recordio", root=rec_root + ".rec", val_split=0.25), seed=0)
    np.testing.assert_array_equal(same.val.x, b.val.x)


def test_recordio_folder_and_explicit_files(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    write_rec(d / "train", [0, 1, 4, 1], make=lambda i: np.full((5, 5, 3), (200, 100, 0), np.uint8))
    write_rec(d / "val", [4, 0])
    b = load_data(DataConfig(name="recordio", root=str(d), grayscale=False, image_size=5))
    assert (len(b.train), len(b.val)) == (4, 2)
    assert b.num_classes == 5                           # max label + 1
    assert b.train.y.tolist() == [0, 1, 4, 1] and b.val.y.tolist() == [4, 0]
    # cv2 stores BGR: (200, 100, 0) packed as BGR reads back as RGB (0, 100, 200).
    np.testing.assert_allclose(b.train.x[0, :, 0, 0], np.array([0, 100, 200]) / 255, atol=1e-6)
    # val (gray 6×7) was converted to 3 equal channels and resized to 5×5.
    assert b.val.x.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(b.val.x[1], 10 / 255, atol=1e-6)
    with pytest.raises(UserError, match=r"different sizes.*train\.rec record 0 is 5×5.*val\.rec"):
        load_data(DataConfig(name="recordio", root=str(d)))
    e = load_data(DataConfig(name="recordio", train=str(d / "train.rec"), val=str(d / "val.rec"),
                             image_size=5))
    assert e.channels == 3 and e.val.x.shape == (2, 3, 5, 5)


def test_recordio_jpeg_rgb_auto_channels(tmp_path):
    p = write_rec(tmp_path / "j", [0, 1] * 4, fmt=".jpg",
                  make=lambda i: np.full((8, 8, 3), (10 * i, 50, 90), np.uint8))
    b = load_data(DataConfig(name="recordio", root=p, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    assert b.channels == 3 and b.train.x.shape[1:] == (3, 8, 8)
    red = np.concatenate([b.train.x, b.val.x])[:, 0, 4, 4] * 0.5 + 0.5   # channel 0 = R = 90
    np.testing.assert_allclose(red, 90 / 255, atol=3 / 255)


def test_recordio_missing_idx(rec_root):
    # Before: a UserError asking for rec2idx.py. Now the .rec is indexed by a scan, in memory.
    ref = load_data(DataConfig(name="recordio", root=rec_root))
    os.remove(rec_root + ".idx")
    before = sorted(os.listdir(os.path.dirname(rec_root)))
    for stream in (None, False):
        b = load_data(DataConfig(name="recordio", root=rec_root, stream=stream))
        np.testing.assert_array_equal(np.asarray(b.train.x), np.asarray(ref.train.x))
        np.testing.assert_array_equal(b.val.y, ref.val.y)
    assert sorted(os.listdir(os.path.dirname(rec_root))) == before     # nothing written there


def test_recordio_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match=r"`data\.root` names .*nothing\.rec, which does not exist"):
        load_data(DataConfig(name="recordio", root=str(tmp_path / "nothing")))
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "c.idx"), str(tmp_path / "c.rec"), "w")
    for i in range(4):
        img = np.full((4, 4), 50 * i, np.uint8)
        s = (mx.recordio.pack(mx.recordio.IRHeader(0, 1.0, i, 0), b"garbage") if i == 2 else
             mx.recordio.pack_img(mx.recordio.IRHeader(0, float(i % 2), i, 0), img, img_fmt=".png"))
        w.write_idx(i, s)
    w.close()
    # in memory (data.stream: false): decoded at load, the unreadable record left out
    b = load_data(DataConfig(name="recordio", root=str(tmp_path / "c"), stream=False))
    assert b.skipped == 1 and len(b.train) + len(b.val) == 3
    with pytest.raises(UserError, match=r"c\.rec record 2"):
        load_data(DataConfig(name="recordio", root=str(tmp_path / "c"), skip_corrupt=False,
                             stream=False))
    # streamed (the default): found when read, a row of zeros, counted once
    s = load_data(DataConfig(name="recordio", root=str(tmp_path / "c")))
    assert s.skipped == 0 and len(s.train) + len(s.val) == 4
    np.asarray(s.train.x), np.asarray(s.val.x), np.asarray(s.train.x)
    assert s.skipped == 1 and s.skipped_count() == 1
    s = load_data(DataConfig(name="recordio", root=str(tmp_path / "c"), skip_corrupt=False))
    with pytest.raises(UserError, match=r"c\.rec record 2.*skip_corrupt"):
        np.concatenate([s.train.x, s.val.x])


def test_recordio_bad_label(tmp_path):
    p = write_rec(tmp_path / "l", [0, 1.5])
    with pytest.raises(UserError, match=r"record 1 has label 1\.5"):
        load_data(DataConfig(name="recordio", root=p))


# -- properties -------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.floats(0.05, 0.95),
       st.integers(0, 2**16), st.integers(1, 70))
def test_split_and_subset_invariants(labels, frac, seed, limit):
    y = np.array(labels)
    tr, va = stratified_split(y, frac, seed)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))    # a partition
    for c in np.unique(y):
        n, n_val = int((y == c).sum()), int((y[va] == c).sum())
        assert n_val == (0 if n < 2 else min(max(round(n * frac), 1), n - 1))
    keep = balanced_subset(y, limit)
    assert len(keep) == min(limit, len(y)) and (np.diff(keep) > 0).all()
    counts = {c: int((y[keep] == c).sum()) for c in np.unique(y)}
    short = [c for c in counts if counts[c] < (y == c).sum()]   # classes not exhausted
    if short:
        assert max(counts.values()) - min(counts[c] for c in short) <= 1
