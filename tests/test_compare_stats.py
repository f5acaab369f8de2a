"""``distill compare``'s paired statistics: the tests against hand-computed values and SciPy,
the verdicts, ``pairs:`` parsing errors, and one comparison of small real runs (two variants ×
two seeds, one with int8) whose pairs must appear in every output form, agree with the run
folders and the cached predictions, and reuse that cache.
"""
import csv
import json
import math
import os
import re

import numpy as np
import pytest
import yaml

from distill.compare import compare, predictions
from distill.compare.report import OUTPUT_FILES
from distill.compare.spec import Side, load_comparison
from distill.compare.stats import (NOISE, format_p, mcnemar_counts, mcnemar_exact_p, pair_result,
                                   paired_t_test, regularized_beta, verdict)
from distill.compare.table import pair_cells
from distill.errors import UserError
from distill.runfolder import RunFolder
from helpers import tiny_teacher


# -- the math ---------------------------------------------------------------------------------
def test_paired_t_test_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t = 2 / (1 / √3) = 2√3; with 2 df the two-sided p is
    # 1 − t / √(2 + t²) (Student's t with 2 df has a closed-form CDF)
    t, p = paired_t_test([1.0, 2.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-9)      # 0.07418
    # 1 df is the Cauchy distribution: p = 1 − 2·atan(|t|)/π; d = 0, 28.125 gives t = 1, p = 0.5
    t, p = paired_t_test([0.0, 28.125])
    assert (t, p) == (pytest.approx(1.0), pytest.approx(0.5, rel=1e-9))
    t, p = paired_t_test([-1.0, -3.0])
    assert t == pytest.approx(-2.0)
    assert p == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, rel=1e-9)


def test_paired_t_test_edges():
    assert paired_t_test([]) == (None, None) and paired_t_test([1.5]) == (None, None)
    assert paired_t_test([0.0, 0.0, 0.0]) == (0.0, 1.0)            # no difference at all
    t, p = paired_t_test([0.5, 0.5, 0.5])                            # the same gain every seed
    assert t == math.inf and p == 0.0


def test_paired_t_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(0)
    for n in (2, 3, 5, 10, 40):
        for shift in (0.0, 0.3, 2.0, 50.0):
            a = rng.normal(size=n)
            b = a - shift - 0.5 * rng.normal(size=n)
            t, p = paired_t_test(a - b)
            ref = stats.ttest_rel(a, b)
            assert t == pytest.approx(ref.statistic, rel=1e-9)
            assert p == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-300), (n, shift)


def test_regularized_beta_known_values():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert regularized_beta(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)        # uniform
        assert regularized_beta(3.0, 1.0, x) == pytest.approx(x ** 3, abs=1e-14)
        assert regularized_beta(1.0, 2.0, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)
    assert regularized_beta(7.5, 7.5, 0.5) == pytest.approx(0.5, abs=1e-14)          # symmetry


def test_mcnemar_exact_p_by_hand():
    # b=10, c=2: 2 · (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 · 79 / 4096
    assert mcnemar_exact_p(10, 2) == 158 / 4096
    assert round(mcnemar_exact_p(10, 2), 4) == 0.0386
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)           # two-sided: symmetric
    assert mcnemar_exact_p(0, 0) == 1.0                                # no discordant image
    assert mcnemar_exact_p(0, 5) == 2 / 32
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(3, 4) == 1.0           # capped at 1
    assert 0.0 < mcnemar_exact_p(3000, 2400) < 1e-12                   # big counts, still exact


def test_mcnemar_exact_p_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    if not hasattr(stats, "binomtest"):
        pytest.skip("scipy too old for binomtest")
    for b, c in ((1, 0), (7, 3), (27, 54), (100, 130), (400, 460)):
        assert mcnemar_exact_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue,
                                                      rel=1e-9)


def test_mcnemar_counts():
    labels = [0, 1, 2, 3, 0, 1]
    a = [0, 1, 0, 3, 1, 1]          # right: 0 1 . 3 . 1
    b = [0, 0, 2, 0, 1, 1]          # right: 0 . 2 . . 1
    assert mcnemar_counts(a, b, labels) == (2, 1)       # A only: images 1, 3; B only: image 2
    assert mcnemar_counts(b, a, labels) == (1, 2)
    with pytest.raises(ValueError):
        mcnemar_counts(a, b[:-1], labels)


def test_verdicts():
    assert verdict("KD", "labels", 0.8, 0.01, 0.002) == "KD better (seeds and McNemar)"
    assert verdict("KD", "labels", -0.8, 0.01, 0.002) == "labels better (seeds and McNemar)"
    assert verdict("KD", "labels", 0.3, 0.2, 0.01) == \
        "KD ahead per-image only (seeds do not support it)"
    assert verdict("KD", "labels", 0.3, None, 0.01) == \
        "KD ahead per-image only (1 seed: not tested over seeds)"
    assert verdict("KD", "labels", 0.3, 0.03, 0.2) == \
        "KD ahead over seeds only (McNemar does not support it)"
    for p_seeds, p_mc in ((0.2, 0.3), (None, 0.06), (0.05, 0.05)):    # 0.05 itself is not < 0.05
        assert verdict("KD", "labels", 0.3, p_seeds, p_mc) == NOISE


def test_format_p():
    assert format_p(0.0386) == "0.039" and format_p(0.0004) == "<0.001" and format_p(1.0) == "1.000"
    assert format_p(None, 1) == "n/a (1 seed)" and format_p(None) == "n/a"


def test_pair_result_by_hand_and_one_seed():
    y = np.arange(10) % 3
    # seed 0: A right on 9, B on 6, b=3 c=0; seed 1: A right on 8, B on 6, b=3 c=1
    a0, b0 = y.copy(), y.copy()
    a0[0] = (y[0] + 1) % 3
    b0[:4] = (y[:4] + 1) % 3
    a1, b1 = y.copy(), y.copy()
    a1[:2] = (y[:2] + 1) % 3
    b1[2:5] = (y[2:5] + 1) % 3
    b1[0] = (y[0] + 1) % 3
    res = pair_result("A", "B", {0: (a0, b0, y), 1: (a1, b1, y)})
    assert res.seeds == [0, 1] and res.images == 20
    assert res.a_top1 == [90.0, 80.0] and res.b_top1 == [60.0, 60.0]
    assert res.diffs == pytest.approx([30.0, 20.0]) and res.diff_mean == pytest.approx(25.0)
    assert res.diff_std == pytest.approx(math.sqrt(50.0))
    assert (res.b_count, res.c_count) == (3 + 3, 0 + 1)
    assert res.p_mcnemar == 2 * (1 + 7) / 2 ** 7                 # 0.125
    # t = 25 / (√50 / √2) = 5 with 1 df: p = 1 − 2·atan(5)/π = 0.126
    assert res.t == pytest.approx(5.0)
    assert res.p_seeds == pytest.approx(1 - 2 * math.atan(5) / math.pi)
    assert res.verdict == NOISE                              # p 0.126 and 0.125: not supported
    one = pair_result("A", "B", {0: (a0, b0, y)})
    assert one.p_seeds is None and one.diff_std is None and one.t is None
    cells = pair_cells(one)
    assert cells[4] == "+30.00" and cells[5] == "n/a (1 seed)" and cells[6] == "3/0"
    assert cells[7] == "0.250"
    with pytest.raises(ValueError):
        pair_result("A", "B", {})


# -- pairs: in comparison recipes -----------------------------------------------------------
def _write(tmp_path, pairs, int8=True):
    teacher = tiny_teacher(tmp_path, epochs=1)
    spec = {"name": "p", "variants": [
        {"name": "pruned + KD", "recipe": os.path.basename(teacher), "int8": int8},
        {"name": "pruned + labels", "recipe": os.path.basename(teacher)}], "pairs": pairs}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(p)


def test_pairs_are_parsed(tmp_path):
    comp = load_comparison(_write(tmp_path, [["pruned + KD", "pruned + labels"],
                                             ["pruned + KD:int8", "pruned + KD"]]))
    assert comp.pairs == [(Side("pruned + KD"), Side("pruned + labels")),
                          (Side("pruned + KD", True), Side("pruned + KD"))]
    assert str(comp.pairs[1][0]) == "pruned + KD:int8"
    assert load_comparison(_write(tmp_path, None)).pairs == []


@pytest.mark.parametrize("pairs, words", [
    ([["pruned + KD", "pruned+labels"]], ["pairs[0]", "'pruned+labels'",
                                           "did you mean `pruned + labels`", "valid names"]),
    ([["pruned + KD", "pruned + labels"], ["pruned + labels:int8", "pruned + KD"]],
     ["pairs[1]", "pruned + labels:int8", "int8: true"]),
    ([["pruned + KD", "pruned + labels", "pruned + KD:int8"]], ["pairs[0]", "exactly two"]),
    ([["pruned + KD"]], ["pairs[0]", "exactly two"]),
    ([["pruned + KD", "pruned + KD"]], ["pairs[0]", "itself"]),
    ({"a": "pruned + KD"}, ["`pairs` must be a list"]),
])
def test_bad_pairs_name_the_pair_and_the_fix(tmp_path, pairs, words):
    with pytest.raises(UserError) as e:
        load_comparison(_write(tmp_path, pairs))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_int8_side_needs_an_int8_variant(tmp_path):
    with pytest.raises(UserError, match=r"pairs\[0\].*no int8 model.*int8: true"):
        load_comparison(_write(tmp_path, [["pruned + KD:int8", "pruned + labels"]], int8=False))


# -- a comparison of small real runs ----------------------------------------------------------
@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Two variants × two seeds of a tiny synthetic teacher recipe: "long" trains 2 epochs at
    lr 0.1 and is quantized, "short" 1 epoch at lr 0.01; pairs long − short and
    long:int8 − long."""
    tmp = tmp_path_factory.mktemp("pairs")
    tiny_teacher(tmp, name="base", epochs=2, num_samples=480)
    spec = {"name": "tiny_pairs", "out": str(tmp / "cmp"), "repeats": 1,
            "variants": [{"name": "long", "recipe": "base.yaml", "int8": True,
                          "set": ["quantization.exclude=none"]},
                         {"name": "short", "recipe": "base.yaml",
                          "set": ["trainer.epochs=1", "trainer.lr=0.01"]}],
            "pairs": [["long", "short"], ["long:int8", "long"]]}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    lines = []
    rows = compare([str(path)], seeds=2, log=lines.append)
    return {"tmp": tmp, "path": str(path), "out": spec["out"], "rows": rows, "log": lines}


def _cached(out, run, int8=False):
    with np.load(os.path.join(out, "predictions", f"{run}{'-int8' if int8 else ''}.npz")) as z:
        return z["pred"], z["labels"], z["stamp"]


def test_pairs_agree_with_the_runs_and_the_cache(paired):
    out = paired["out"]
    with open(os.path.join(out, OUTPUT_FILES["json"])) as f:
        doc = json.load(f)
    pairs = doc["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("long", "short"), ("long:int8", "long")]
    metrics = {os.path.basename(r["folder"]): r["values"] for r in doc["runs"]}
    for p in pairs:
        assert p["seeds"] == [0, 1] and p["images"] == 2 * 96          # 96 val images per seed
        bc = [0, 0]
        for i, s in enumerate(p["seeds"]):
            sides = []
            for name, top1 in ((p["a"], p["a_top1"][i]), (p["b"], p["b_top1"][i])):
                run, int8 = f"{name.split(':')[0]}-s{s}", name.endswith(":int8")
                pred, labels, stamp = _cached(out, run, int8)
                assert pred.dtype == np.int16 and pred.shape == labels.shape == (96,)
                prefix = RunFolder(os.path.join(out, run)).model_prefix + ("-int8" if int8 else "")
                st = os.stat(prefix + "-0000.params")
                assert list(stamp) == [st.st_size, st.st_mtime_ns]
                # the predictions are the models the run measured: its metrics.json top-1
                assert top1 == pytest.approx(np.mean(pred == labels) * 100)
                reported = metrics[run]["top1_int8" if int8 else "top1"]
                assert top1 == pytest.approx(reported, abs=5e-4)       # rounded to 3 decimals
                sides.append((pred, labels))
            (pa, ya), (pb, yb) = sides
            assert np.array_equal(ya, yb)
            b, c = mcnemar_counts(pa, pb, ya)
            bc = [bc[0] + b, bc[1] + c]
            assert p["diffs"][i] == pytest.approx(p["a_top1"][i] - p["b_top1"][i])
        assert [p["b_count"], p["c_count"]] == bc and p["p_mcnemar"] == mcnemar_exact_p(*bc)
        assert p["p_seeds"] == pytest.approx(paired_t_test(p["diffs"])[1])
        assert p["diff_std"] == pytest.approx(float(np.std(p["diffs"], ddof=1)))
        assert p["verdict"] == verdict(p["a"], p["b"], p["diff_mean"], p["p_seeds"], p["p_mcnemar"])
        assert p["notes"] == []
    # "long" learnt more than "short" on these images (2 epochs at lr 0.1 vs 1 at 0.01)
    assert pairs[0]["b_count"] > pairs[0]["c_count"]


def _md_row(p):
    diff = f"{p['diff_mean']:+.2f} ± {p['diff_std']:.2f}"
    return (f"| {p['a']} − {p['b']} | 2 | {p['a_mean']:.2f} | {p['b_mean']:.2f} | {diff} | "
            f"{format_p(p['p_seeds'])} | {p['b_count']}/{p['c_count']} | "
            f"{format_p(p['p_mcnemar'])} | {p['verdict']} |")


def test_pairs_in_every_output(paired):
    out = paired["out"]
    with open(os.path.join(out, OUTPUT_FILES["json"])) as f:
        pairs = json.load(f)["pairs"]
    md = open(os.path.join(out, OUTPUT_FILES["md"])).read()
    assert md.index("| variant |") < md.index("## Paired comparisons")   # after the main table
    for p in pairs:
        assert _md_row(p) in md
    with open(os.path.join(out, OUTPUT_FILES["pairs_csv"])) as f:
        lines = list(csv.DictReader(f))
    assert [(l["a"], l["b"]) for l in lines] == [(p["a"], p["b"]) for p in pairs]
    for l, p in zip(lines, pairs):
        assert l["seeds"] == "0 1" and l["verdict"] == p["verdict"]
        for k, j in (("diff_mean", "diff_mean"), ("p_seeds", "p_seeds"), ("p_mcnemar", "p_mcnemar"),
                     ("a_top1_mean", "a_mean"), ("b_top1_mean", "b_mean")):
            assert float(l[k]) == p[j], k
        assert (int(l["mcnemar_b"]), int(l["mcnemar_c"])) == (p["b_count"], p["c_count"])
    with open(os.path.join(out, OUTPUT_FILES["csv"])) as f:      # the variants' CSV is unchanged
        assert [l["variant"] for l in csv.DictReader(f)] == ["long", "short"]
    html = open(os.path.join(out, OUTPUT_FILES["html"])).read()
    section = html[html.index("<h2>Paired comparisons</h2>"):]
    for p in pairs:
        cells = re.escape(f"<td>{p['a']} − {p['b']}</td><td>2</td><td>{p['a_mean']:.2f}</td>")
        assert re.search(cells, section)
        assert f"<td>{p['b_count']}/{p['c_count']}</td>" in section
    table = next(l for l in paired["log"] if "p (McNemar)" in l)
    assert table.lstrip("\n").startswith("Paired comparisons")
    assert all(f"{p['a']} − {p['b']}" in table for p in pairs)


def test_cached_predictions_are_reused_until_the_model_changes(paired, monkeypatch):
    calls = []
    real = predictions.predict_classes

    def counting(net, x, batch_size):
        calls.append(len(x))
        return real(net, x, batch_size)
    monkeypatch.setattr(predictions, "predict_classes", counting)
    with open(os.path.join(paired["out"], OUTPUT_FILES["json"])) as f:
        before = json.load(f)["pairs"]
    compare([paired["path"]], seeds=2, repeats=1, log=lambda s: None)
    assert calls == []                                   # all six from the cache
    # a retrained model (its params file rewritten): that run alone is predicted again
    params = RunFolder(os.path.join(paired["out"], "short-s1")).model_params_path
    st = os.stat(params)
    os.utime(params, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    compare([paired["path"]], seeds=2, repeats=1, log=lambda s: None)
    assert calls == [96]
    assert _cached(paired["out"], "short-s1")[2][1] == st.st_mtime_ns + 10 ** 9
    with open(os.path.join(paired["out"], OUTPUT_FILES["json"])) as f:
        after = json.load(f)["pairs"]
    assert after == before


def test_collected_run_folders_have_no_pairs(paired, tmp_path):
    folders = [r.folder.path for row in paired["rows"] for r in row.records]
    out = tmp_path / "coll"
    compare(folders, out=str(out), repeats=1, log=lambda s: None)
    assert not (out / OUTPUT_FILES["pairs_csv"]).exists()
    assert "Paired" not in (out / OUTPUT_FILES["md"]).read_text()
    assert "Paired" not in (out / OUTPUT_FILES["html"]).read_text()
    assert "pairs" not in json.loads((out / OUTPUT_FILES["json"]).read_text())


def test_one_seed_has_no_seed_test(paired):
    """``--seeds 1`` (the seed-0 runs reused): the seed test is n/a, McNemar still counts."""
    lines = []
    compare([paired["path"]], seeds=1, repeats=1, log=lines.append)
    with open(os.path.join(paired["out"], OUTPUT_FILES["json"])) as f:
        pairs = json.load(f)["pairs"]
    assert not any("predicting" in l for l in lines)             # seed 0's cache serves
    for p in pairs:
        assert p["seeds"] == [0] and p["images"] == 96
        assert p["p_seeds"] is None and p["diff_std"] is None and p["t"] is None
        assert p["p_mcnemar"] == mcnemar_exact_p(p["b_count"], p["c_count"])
        assert "seeds do not support" not in p["verdict"]        # with one seed, never tested
    md = open(os.path.join(paired["out"], OUTPUT_FILES["md"])).read()
    for p in pairs:
        assert (f"| {p['a']} − {p['b']} | 1 | {p['a_mean']:.2f} | {p['b_mean']:.2f} | "
                f"{p['diff_mean']:+.2f} | n/a (1 seed) | {p['b_count']}/{p['c_count']} | "
                f"{format_p(p['p_mcnemar'])} | {p['verdict']} |") in md
