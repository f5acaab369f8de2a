"""``fashion_mnist``: read from the four idx files (written here, tiny), val = the test set,
selection on a holdout of the training set, and a damaged or missing file named in one paragraph."""
import gzip
import os
import struct

import numpy as np
import pytest
import yaml

from distill.data import load_data
from distill.data.fashion_mnist import FILES, read_idx
from distill.errors import UserError
from distill.recipe import recipe_from_dict
from helpers import run_cli, write_fashion


def _recipe(root, **data):
    return recipe_from_dict({"name": "f", "data": {"name": "fashion_mnist", "root": root, **data},
                             "student": {"model": "mobilenet0.25"}, "distillation": [{"loss": "ce"}]})


def test_reads_the_idx_files_val_is_the_test_set_selection_is_held_out(tmp_path):
    root = write_fashion(str(tmp_path / "fm"), n_train=100)
    d = load_data(_recipe(root, val_split=0.2).data)
    assert d.train.x.shape == (80, 1, 28, 28) and len(d.selection) == 20 and len(d.val) == 20
    assert d.select is not None and d.selection is d.select
    np.testing.assert_array_equal(d.val.y, np.arange(20) % 10)               # the t10k files, in order
    assert np.bincount(d.selection.y).tolist() == [2] * 10 and np.bincount(d.train.y).tolist() == [8] * 10
    # pixels scaled to [0, 1] from the raw bytes: the first test image is class 0 (values < 20)
    raw = read_idx(os.path.join(root, FILES["test_images"]), 3)
    np.testing.assert_allclose(d.val.x[0, 0], raw[0] / 255.0, rtol=1e-6)
    # the holdout never overlaps the training images
    flat = lambda a: {a[i].tobytes() for i in range(len(a))}              # noqa: E731
    assert not flat(d.train.x) & flat(d.selection.x)
    # a dataset without a test set of its own selects on val, as before
    assert load_data(recipe_from_dict({"name": "s", "data": {"name": "digits"}, "student": {
        "model": "mobilenet0.25"}, "distillation": [{"loss": "ce"}]}).data).select is None


@pytest.mark.parametrize("damage", ["truncated", "header", "magic", "missing"])
def test_a_damaged_or_missing_file_is_named(tmp_path, damage):
    root = write_fashion(str(tmp_path / "fm"))
    path = os.path.join(root, FILES["train_images"])
    raw = gzip.open(path).read()
    if damage == "truncated":
        with gzip.open(path, "wb") as f:
            f.write(raw[:-100])
    elif damage == "header":
        with gzip.open(path, "wb") as f:
            f.write(raw[:6])
    elif damage == "magic":
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">I", 0x0D03) + raw[4:])
    else:
        os.unlink(path)
    with pytest.raises(UserError) as e:
        load_data(_recipe(root).data)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert {"truncated": "truncated", "header": "truncated", "magic": "magic",
            "missing": "missing"}[damage] in msg


def test_missing_root_exits_2_with_the_path_and_the_install_hint(tmp_path):
    root = str(tmp_path / "nowhere")
    path = str(tmp_path / "f.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"name": "f", "data": {"name": "fashion_mnist", "root": root},
                        "student": {"model": "mobilenet0.25"}, "distillation": [{"loss": "ce"}],
                        "trainer": {"epochs": 1, "progress": False},
                        "output": {"dir": str(tmp_path / "run"), "latency": False}}, f)
    res = run_cli(path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())
    assert root in err and "apt-get install dataset-fashion-mnist" in err and "Zalando" in err


def test_a_run_trains_and_reports_on_the_test_set(tmp_path):
    root = write_fashion(str(tmp_path / "fm"), n_train=200, n_test=50)
    path = str(tmp_path / "f.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"name": "f", "data": {"name": "fashion_mnist", "root": root, "val_split": 0.1},
                        "student": {"model": "mobilenet0.25"}, "distillation": [{"loss": "ce"}],
                        "trainer": {"epochs": 1, "batch_size": 32, "progress": False},
                        "quantization": {"enabled": True, "exclude": "auto", "calib_batches": 1,
                                         "layer_latency": False},
                        "output": {"dir": str(tmp_path / "run"), "latency": False,
                                   "latency_repeats": 1}}, f)
    res = run_cli(path)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    m = json.load(open(str(tmp_path / "run" / "metrics.json")))
    assert m["data"]["val"] == 50 and m["data"]["train"] == 180
    # the int8 policy chose on the 20 held-out training images; its figures are the test set's
    q = m["int8"]
    assert q["selected_on"]["split"] == "select" and q["selected_on"]["images"] == 20
    assert q["split_images"] == 50
    assert q["fp32"]["top1"] * 50 / 100 == pytest.approx(round(q["fp32"]["top1"] * 50 / 100))


def test_pruning_sensitivity_reads_the_training_holdout(tmp_path):
    """Sensitivity drops rank the cuts (a choice): the probe measures them on data.selection,
    the holdout, not on the test set; with eval_limit, on its first images."""
    from distill.pruning.probe import Probe
    d = load_data(_recipe(write_fashion(str(tmp_path / "fm"), n_train=100)).data)
    probe = Probe(None, {}, "data", d, 1, 1, 32, str(tmp_path))
    assert probe.val is d.select and probe.val is not d.val
    short = Probe(None, {}, "data", d, 1, 1, 32, str(tmp_path), eval_limit=5)
    np.testing.assert_array_equal(short.val.x, d.select.x[:5])
