"""Every bad input gets one clear paragraph from the real CLI: exit code 2, the file/key/layer
at fault named, what would be valid, and no Python traceback."""
import dataclasses
import os

import mxnet as mx
import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import run_cli
from modapi import branchy_symbol

FAST = {"trainer": {"epochs": 1, "batch_size": 16, "progress": False}}


def _recipe(tmp, body, name="r"):
    body = dict(body)
    body.setdefault("name", name)
    body.setdefault("output", {"dir": str(tmp / "runs" / name), "latency": False})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _fails(res, *needles):
    out = res.stdout + res.stderr
    assert res.returncode == 2, f"exit {res.returncode}: {out[-2000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert "error:" in res.stderr
    flat = " ".join(res.stderr.split())          # the paragraph is wrapped at 100 columns
    for n in needles:
        assert n in flat, f"{n!r} not in: {res.stderr[-1500:]}"
    return flat


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained Module-API checkpoint for 1×8×8 inputs, 10 classes."""
    tmp = tmp_path_factory.mktemp("ckpt")
    mod = mx.mod.Module(branchy_symbol(10, 8), data_names=["data"], label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", (1, 1, 8, 8))], label_shapes=[("softmax_label", (1,))])
    mod.init_params(mx.init.Xavier())
    prefix = str(tmp / "net")
    mod.save_checkpoint(prefix, 0)
    return prefix


def _teacher_recipe(tmp, prefix, name, data=None):
    return _recipe(tmp, {"data": data or {"name": "digits"}, "teacher": {"checkpoint": prefix},
                         "student": {"model": "mobilenet0.25"},
                         "distillation": [{"loss": "kd"}], **FAST}, name)


# -- recipe -------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrainer:\n  epochs: 2\n    lr: 0.1\n")
    _fails(run_cli(str(p)), str(p), "line 4")


def test_unknown_nested_key_suggests(tmp_path):
    err = _fails(run_cli(_recipe(tmp_path, {"data": {"name": "digits", "grayscle": True}})),
                 "`data.grayscle`", "`grayscale`")
    assert "Valid keys" in err


@pytest.mark.parametrize("body,key", [
    ({"trainer": {"lr": -0.1}}, "trainer.lr"),
    ({"trainer": {"epochs": 0}}, "trainer.epochs"),
    ({"trainer": {"epochs": "ten"}}, "trainer.epochs"),
    ({"teacher": {"recipe": "t.yaml"}, "distillation": [{"loss": "kd", "temperature": 0}]},
     "distillation[0].temperature"),
    ({"pruning": {"enabled": True, "final_sparsity": 1.5}}, "pruning.final_sparsity"),
])
def test_wrong_type_or_range(tmp_path, body, key):
    _fails(run_cli(_recipe(tmp_path, body)), f"`{key}`")


def test_missing_recipe_file():
    _fails(run_cli("/nonexistent/recipe.yaml"), "/nonexistent/recipe.yaml", "does not exist")


def test_set_without_value(tmp_path):
    _fails(run_cli(_recipe(tmp_path, {}), "--set", "trainer.epochs"), "KEY=VALUE")


# -- files and data ------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path):
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "image_folder", "root": str(tmp_path / "nope")}})),
           str(tmp_path / "nope"))


def test_unknown_dataset_lists_valid(tmp_path):
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "mnist"}})), "mnist5k", "data.name")


def test_unknown_student_lists_valid(tmp_path):
    _fails(run_cli(_recipe(tmp_path, {"student": {"model": "mobilenetv2_5"}})), "mobilenetv2_0.5")


def test_missing_teacher_checkpoint(tmp_path):
    _fails(run_cli(_teacher_recipe(tmp_path, str(tmp_path / "nothere"), "t")), "nothere-symbol.json",
           "teacher.checkpoint")


def _png(path, size=(8, 8), mode="L", seed=0):
    rs = np.random.RandomState(seed)
    shape = size if mode == "L" else size + (3,)
    Image.fromarray(rs.randint(0, 255, shape).astype(np.uint8), mode).save(path)


def _folder(root, classes=("a", "b"), per=6):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per):
            _png(root / c / f"{i}.png", seed=i)


def test_image_folder_without_classes(tmp_path):
    (tmp_path / "imgs").mkdir()
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "image_folder", "root": str(tmp_path / "imgs")}})),
           "no class subfolders")


def test_image_folder_empty_class(tmp_path):
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "c").mkdir()
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "image_folder", "root": str(tmp_path / "imgs")}})),
           os.path.join("imgs", "c"), "empty")


def test_image_folder_corrupt_file_fails_when_asked(tmp_path):
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "image_folder", "root": str(tmp_path / "imgs"),
                                               "skip_corrupt": False}})),
           "broken.png", "skip_corrupt")


def test_image_folder_corrupt_file_skipped_and_counted(tmp_path):
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "b" / "notes.txt").write_text("hello")
    res = run_cli(_recipe(tmp_path, {"data": {"name": "image_folder", "root": str(tmp_path / "imgs"),
                                              "val_split": 0.25},
                                     "student": {"model": "cifar_resnet20_v1"}, **FAST}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 2" in (res.stdout + res.stderr).lower() or "2 unreadable" in (res.stdout + res.stderr)


def test_fewer_images_than_classes_fails_at_load(tmp_path):
    # 96 images of 100 classes: one image per class at most, so val gets none. Before: an epoch
    # trained, then MXNet's "Cannot find attribute forward_mem_plan" traceback (an empty batch)
    r = _recipe(tmp_path, {"data": {"name": "synthetic", "num_samples": 96, "num_classes": 100,
                                    "image_size": 8},
                           "student": {"model": "cifar_resnet20_v1"}, **FAST}, "degenerate")
    res = run_cli(r)
    _fails(res, "val split has no images", "96 train / 0 val images, 100 classes",
           "`data.num_samples` (now 96)", "200")
    assert "epoch 1/" not in res.stdout and "forward_mem_plan" not in res.stderr


def test_load_data_refuses_empty_splits(monkeypatch):
    from distill import data as D
    from distill.data import SourceData, load_data
    from distill.errors import UserError
    from distill.recipe import DataConfig
    with pytest.raises(UserError, match=r"val split has no images \(8 train / 0 val images, 10 "
                                        r"classes\).*`data\.val_split` \(0\.2\).*largest class here has 1"):
        load_data(DataConfig(name="synthetic", num_samples=8, num_classes=10))
    # one image per split is not degenerate: a train split smaller than a batch is one batch
    b = load_data(DataConfig(name="synthetic", num_samples=20, num_classes=2, limit=1))
    assert (len(b.train), len(b.val)) == (1, 4)
    # a loader that leaves train empty (every image in its val set)
    x = np.zeros((4, 1, 8, 8), np.float32)
    y = np.array([0, 1, 0, 1], np.int32)
    empty = SourceData(x_train=x[:0], y_train=y[:0], x_val=x, y_val=y, class_names=["a", "b"],
                       source="test")
    monkeypatch.setattr(D.DATASETS, "get", lambda name, where=None: lambda cfg, seed: empty)
    with pytest.raises(UserError, match=r"train split has no images \(0 train / 4 val images, 2 "
                                        r"classes\).*`data\.val_split`"):
        load_data(DataConfig(name="synthetic"))
    # ... or, reading only its part (as `recordio` does), one worker's part of train
    def part_loader(cfg, seed, part_index=0, num_parts=1):
        return dataclasses.replace(empty, sharded=True)
    part_loader.reads_parts = True
    monkeypatch.setattr(D.DATASETS, "get", lambda name, where=None: part_loader)
    with pytest.raises(UserError, match=r"0 train, worker 2 of 2 / 4 val.*fewer workers"):
        load_data(DataConfig(name="synthetic"), part_index=1, num_parts=2)


def test_recordio_without_idx(tmp_path):
    # A missing .idx is no longer an error (the .rec is indexed by a scan, nothing written);
    # a .rec whose records hold no image still is, naming the file.
    rec = mx.recordio.MXRecordIO(str(tmp_path / "train.rec"), "w")
    rec.write(mx.recordio.pack(mx.recordio.IRHeader(0, 0.0, 0, 0), b"x"))
    rec.close()
    _fails(run_cli(_recipe(tmp_path, {"data": {"name": "recordio", "train": str(tmp_path / "train.rec")}})),
           "train.rec", "could be decoded as an image")
    assert not os.path.exists(tmp_path / "train.idx")


# -- teacher vs data -----------------------------------------------------------------------------

def test_teacher_params_missing(tmp_path, checkpoint):
    params = mx.nd.load(checkpoint + "-0000.params")
    del params["arg:pw_conv_weight"]
    mx.nd.save(str(tmp_path / "t-0000.params"), params)
    os.symlink(checkpoint + "-symbol.json", tmp_path / "t-symbol.json")
    _fails(run_cli(_teacher_recipe(tmp_path, str(tmp_path / "t"), "pm")), "pw_conv_weight")


def test_teacher_params_extra(tmp_path, checkpoint):
    params = mx.nd.load(checkpoint + "-0000.params")
    params["arg:mystery_weight"] = mx.nd.zeros((3,))
    mx.nd.save(str(tmp_path / "t-0000.params"), params)
    os.symlink(checkpoint + "-symbol.json", tmp_path / "t-symbol.json")
    _fails(run_cli(_teacher_recipe(tmp_path, str(tmp_path / "t"), "pe")), "mystery_weight")


def test_teacher_params_shape(tmp_path, checkpoint):
    params = mx.nd.load(checkpoint + "-0000.params")
    params["arg:fc_weight"] = mx.nd.zeros((10, 7))
    mx.nd.save(str(tmp_path / "t-0000.params"), params)
    os.symlink(checkpoint + "-symbol.json", tmp_path / "t-symbol.json")
    _fails(run_cli(_teacher_recipe(tmp_path, str(tmp_path / "t"), "ps")), "fc_weight", "(10, 7)")


def test_teacher_classes_differ_from_data(tmp_path, checkpoint):
    data = {"name": "synthetic", "num_classes": 4, "image_size": 8, "num_samples": 64}
    _fails(run_cli(_teacher_recipe(tmp_path, checkpoint, "cls", data)), "4 classes")


def test_teacher_channels_differ_from_data(tmp_path, checkpoint):
    data = {"name": "digits", "grayscale": False}
    _fails(run_cli(_teacher_recipe(tmp_path, checkpoint, "ch", data)), "stem_conv_weight", "grayscale")


def test_tap_that_matches_nothing(tmp_path, checkpoint):
    r = _recipe(tmp_path, {"data": {"name": "digits"}, "teacher": {"checkpoint": checkpoint},
                           "student": {"model": "mobilenet0.25"},
                           "distillation": [{"loss": "hint", "teacher_layer": "concatenate",
                                             "student_layer": "conv0_fwd"}], **FAST}, "tap")
    _fails(run_cli(r), "teacher_layer", "concatenate", "concat")


def test_pruning_exclude_pattern_that_matches_nothing(tmp_path):
    r = _recipe(tmp_path, {"data": {"name": "synthetic", "num_samples": 64, "image_size": 8},
                           "student": {"model": "cifar_resnet20_v1"},
                           "pruning": {"enabled": True, "exclude": ["*no_such_layer*"]}, **FAST}, "ex")
    res = run_cli(r)
    _fails(res, "pruning.exclude", "*no_such_layer*", "matches no layer")
    assert "epoch 1/" not in res.stdout
