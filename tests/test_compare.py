"""``distill compare``: a comparison recipe of small real runs, every column checked against the
run folders; collecting run folders; an interrupted comparison reusing complete runs; the HTML
rendered in headless Chromium (skipped where it is absent).

One module-scoped comparison: a tiny teacher (synthetic 16×16, one epoch) as a variant of its
own with int8 and ncnn-int8 export, and a KD student of it (mobilenet0.25, one epoch).
"""
import csv
import json
import os
import re
import shutil
import subprocess

import mxnet as mx
import numpy as np
import pytest
import yaml

from distill.compare import compare
from distill.compare.collect import LATENCY_KEYS
from distill.compare.plots import pareto_front
from distill.compare.report import OUTPUT_FILES
from distill.compare.spec import load_comparison
from distill.errors import UserError
from distill.graphio import AUX_SUFFIXES, pair_files
from distill.runfolder import RunFolder
from helpers import tiny_student, tiny_teacher


def _close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    teacher = tiny_teacher(tmp, epochs=1)
    student = tiny_student(tmp, teacher, epochs=1)
    spec = {"name": "tiny_compare", "out": str(tmp / "cmp"), "repeats": 2,
            "variants": [
                {"name": "teacher", "recipe": os.path.basename(teacher), "int8": True,
                 "export": ["ncnn-int8"], "set": ["quantization.exclude=none"]},
                {"name": "KD student", "recipe": os.path.basename(student)}]}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    lines = []
    rows = compare([str(path)], log=lines.append)
    return {"tmp": tmp, "path": str(path), "rows": rows, "out": spec["out"], "log": lines}


def _pair_bytes(prefix):
    return sum(os.path.getsize(f) for f in pair_files(prefix))


def _nonzero(prefix):
    raw = mx.nd.load(pair_files(prefix)[1])
    return sum(int(np.count_nonzero(v.asnumpy())) for k, v in raw.items()
               if not k.split(":", 1)[-1].endswith(AUX_SUFFIXES))


def test_every_column_is_the_run_folders(comparison):
    rows = comparison["rows"]
    assert [r.label for r in rows] == ["teacher", "KD student"]
    for row in rows:
        (rec,) = row.records
        folder = RunFolder(rec.folder.path)
        assert os.path.dirname(folder.path) == comparison["out"]
        m = folder.read_metrics()
        assert m["complete"]
        s = m["student"]
        v = rec.values
        assert v["top1"] == s["top1"] and v["params"] == s["params"] and v["macs"] == s["macs"]
        assert v["train_s"] == m["train_time_s"]
        assert v["bytes"] == _pair_bytes(folder.model_prefix)
        assert v["nonzero"] == _nonzero(folder.model_prefix) and 0 < v["nonzero"] <= v["params"]
        for k in ("ms_b1", "ms_b32"):
            assert 0 < v[k] < 1e4
        int8 = row.label == "teacher"
        assert (v["top1_int8"] == m["int8"]["top1"]) if int8 else v["top1_int8"] is None
        assert (v["bytes_int8"] == _pair_bytes(folder.int8_prefix)) if int8 else v["bytes_int8"] is None
        for k in ("int8_ms_b1", "int8_ms_b32", "ncnn_int8_ms_b1"):
            assert (v[k] > 0) if int8 else v[k] is None, k
        assert row.mean("top1") == v["top1"] and row.std("top1") is None    # one seed: no spread


def test_files_carry_the_same_numbers(comparison):
    out, rows = comparison["out"], comparison["rows"]
    with open(os.path.join(out, OUTPUT_FILES["csv"])) as f:
        lines = list(csv.DictReader(f))
    assert [l["variant"] for l in lines] == [r.label for r in rows]
    for line, row in zip(lines, rows):
        rec = row.records[0]
        assert line["run_folders"] == rec.folder.path and line["seeds"] == "0"
        for k, v in rec.values.items():
            assert (line[k] == "") if v is None else _close(float(line[k]), v), k
    with open(os.path.join(out, OUTPUT_FILES["json"])) as f:
        runs = json.load(f)["runs"]
    assert [r["values"] for r in runs] == [row.records[0].values for row in rows]
    md = open(os.path.join(out, OUTPUT_FILES["md"])).read()
    teacher = rows[0].records[0].values
    assert f"| teacher | 1 | {teacher['top1']:.2f} | {teacher['top1_int8']:.2f} |" in md
    assert f"{teacher['ncnn_int8_ms_b1']:.3f}" in md
    html = open(os.path.join(out, OUTPUT_FILES["html"])).read()
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 2 and "http" not in html.replace("http-equiv", "")
    import base64
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    # the terminal table was printed with every row
    table = next(l for l in comparison["log"] if "run folder" in l)
    assert all(r.label in table for r in rows)


def test_resume_reuses_complete_runs(comparison):
    folders = [r.records[0].folder for r in comparison["rows"]]
    stamps = [os.path.getmtime(f.metrics_path) for f in folders]
    ncnn = comparison["rows"][0].records[0].ncnn_int8
    ncnn_stamp = os.path.getmtime(ncnn[1])
    lines = []
    rows = compare([comparison["path"]], repeats=1, log=lines.append)
    assert [os.path.getmtime(f.metrics_path) for f in folders] == stamps   # nothing retrained
    assert os.path.getmtime(ncnn[1]) == ncnn_stamp                          # nor re-exported
    assert sum("reusing" in l for l in lines) == 2
    assert [r.records[0].values["top1"] for r in rows] == \
        [r.records[0].values["top1"] for r in comparison["rows"]]


def test_collecting_run_folders_via_the_cli(comparison, tmp_path, capsys):
    from distill.cli import main
    folders = [r.records[0].folder.path for r in comparison["rows"]]
    out = tmp_path / "coll"
    assert main(["compare", *folders, "--out", str(out), "--repeats", "1"]) == 0
    with open(out / OUTPUT_FILES["csv"]) as f:
        lines = list(csv.DictReader(f))
    # collected rows are named by their recipes and keep the recipe run's numbers
    assert [l["variant"] for l in lines] == ["tiny_teacher", "tiny_student"]
    for line, row in zip(lines, comparison["rows"]):
        v = row.records[0].values
        for k in ("top1", "top1_int8", "params", "nonzero", "macs", "bytes", "train_s"):
            assert (line[k] == "") if v[k] is None else _close(float(line[k]), v[k]), k
        assert line["run_folders"] == row.records[0].folder.path
    printed = capsys.readouterr().out
    assert "tiny_teacher" in printed and "ms b32" in printed


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    from distill.cli import main
    assert main(["compare", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_seeds_of_one_recipe_form_one_row(comparison, tmp_path):
    """Collected folders that differ only in ``trainer.seed`` are one row: mean ± std."""
    src = comparison["rows"][1].records[0].folder
    copy = RunFolder(str(tmp_path / "seed1"))
    shutil.copytree(src.path, copy.path)
    r = copy.read_recipe_dict()
    r["trainer"]["seed"] = 1
    copy.write_recipe_dict(r)
    m = copy.read_metrics()
    m["student"]["top1"] = m["student"]["top1"] + 2.0
    copy.write_metrics(m)
    rows = compare([src.path, copy.path], out=str(tmp_path / "out"), repeats=1, log=lambda s: None)
    (row,) = rows
    assert row.seeds == [0, 1]
    top = [src.read_metrics()["student"]["top1"], m["student"]["top1"]]
    assert _close(row.mean("top1"), float(np.mean(top)))
    assert _close(row.std("top1"), float(np.std(top, ddof=1)))
    assert "±" in open(tmp_path / "out" / OUTPUT_FILES["md"]).read()


def test_pareto_front():
    pts = [(1.0, 90.0), (2.0, 95.0), (3.0, 94.0), (2.0, 93.0), (4.0, 96.0)]
    assert pareto_front(pts) == [0, 1, 4]
    assert pareto_front([(1.0, 90.0), (1.0, 90.0)]) == [0, 1]       # equal points: both stay


def test_bad_comparison_recipes_name_the_key(tmp_path):
    teacher = tiny_teacher(tmp_path, epochs=1)
    cases = [({"variants": [{"name": "a", "recipe": os.path.basename(teacher), "sett": []}]}, "sett"),
             ({"variants": [{"name": "a", "recipe": "nope.yaml"}]}, "nope.yaml"),
             ({"variants": [{"name": "a", "recipe": os.path.basename(teacher),
                             "set": ["trainer.epochz=2"]}]}, "epochz"),
             ({"variants": [{"name": "a", "recipe": os.path.basename(teacher), "export": ["ncnx"]}]},
              "ncnx"),
             ({"variants": []}, "variants")]
    for spec, word in cases:
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(spec))
        with pytest.raises(UserError, match=re.escape(word)):
            load_comparison(str(p))


def test_standard_comparison_recipe_loads():
    from helpers import ROOT
    comp = load_comparison(os.path.join(ROOT, "recipes", "compare_mnist.yaml"))
    names = [v.name for v in comp.variants]
    assert len(names) >= 7
    assert any(v.int8 and "ncnn-int8" in v.export for v in comp.variants)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="headless Chromium is not installed")
def test_html_plots_load_in_chromium(comparison, tmp_path):
    html = open(os.path.join(comparison["out"], OUTPUT_FILES["html"])).read()
    # after load, write every image's decoded width into the DOM for --dump-dom to show
    probe = ("<script>window.addEventListener('load', function () {"
             "document.body.setAttribute('data-widths', Array.from(document.images)"
             ".map(function (i) { return i.naturalWidth; }).join(','));});</script>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    res = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom", f"file://{page}"],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-widths="([0-9,]*)"', res.stdout)
    assert m, res.stderr[-1000:]
    widths = [int(w) for w in m.group(1).split(",")]
    assert len(widths) == 2 and all(w >= 300 for w in widths)
