"""`make bench`'s collector: every script's targets in one table, failures included; and every
bench script's ``--smoke`` mode run end to end (tiny data, a temporary folder, seconds)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import run_all  # noqa: E402


def test_run_all_collects_every_target_and_failed_scripts(tmp_path, monkeypatch, capsys):
    (tmp_path / "good.py").write_text(
        "from bench.targets import target\n"
        "target('speed-up b32', '≥ 2×', '2.50×', True)\n"
        "target('top-1 vs teacher', '≥ −1 point', '−1.20', False)\n")
    (tmp_path / "broken.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "targets.py").write_text("")            # the helper module is not a bench
    monkeypatch.setattr(run_all, "HERE", str(tmp_path))
    assert run_all.scripts() == ["broken", "good"]
    code = run_all.main([])
    out = capsys.readouterr().out
    table = out[out.index("make bench: every target"):]
    assert "speed-up b32" in table and "2.50×" in table and "yes" in table
    assert "top-1 vs teacher" in table and "NO" in table
    assert "script failed: exit 3" in table
    assert "1 of 3 hold" in out and code == 1
    assert run_all.main(["nope"]) == 2


def test_every_bench_script_reports_through_targets():
    here = os.path.join(ROOT, "bench")
    for name in run_all.scripts():
        text = open(os.path.join(here, name + ".py")).read()
        assert "from bench.targets import target" in text and "target(" in text, name


def test_every_bench_script_imports():
    """A bench script's imports break silently (nothing else imports it): import them all, in a
    child process (some set OMP_NUM_THREADS at import)."""
    import subprocess
    names = run_all.scripts() + ["peers"]      # make bench-peers' script, not run_all's (it needs torch)
    code = "import importlib\nfor n in %r:\n    importlib.import_module('bench.' + n)\n" % names
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


#: the heading of the table each script prints before its targets (a script not listed here must
#: print at least one table of ``distill.report.format_table``: a rule line of dashes)
TABLES = {
    "distributed": r"mode +workers +global batch +images/s",
    "export": r"export quickstart \(teacher\) → ",
    "int8": r"latency, best of \d+ \(ms\); speed-up = fused fp32 / int8",
    "pipeline": r": the whole pipeline on ",
    "prune": r"== 2\. mnist5k",
    "prune_target": r"== \S+: target latency ",
    "qat": r"PTQ vs QAT \(split: ",
    "teacher_cost": r"teacher cost per epoch",
}
#: what a measured value must not be: the words a script writes when it measured nothing
PLACEHOLDERS = {"", "-", "?", "n/a", "na", "none", "null", "nan", "failed", "skipped", "todo",
                "not measured"}


#: scripts whose smoke run has its own test below (the generic checks run there too, once)
DEDICATED = ("scale", "loop_speed")


def smoke(name, tmp_path):
    """``bench/NAME.py --smoke``: exit 0, its table printed, and every target it checks recorded
    (through ``BENCH_RESULTS``, as ``make bench`` collects them) with a measured value.
    Returns the output and the work folder."""
    results, work = tmp_path / "results.jsonl", tmp_path / "work"
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name + ".py"), "--smoke",
                          "--out", str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\n{out[-3000:]}\n{res.stderr[-3000:]}"
    assert os.listdir(work), "the smoke run wrote nothing into its --out folder"
    heading = TABLES.get(name, r"(?m)^-{10,}$")
    assert re.search(heading, out), f"{name}.py printed no table ({heading!r}):\n{out[-3000:]}"
    assert results.is_file(), f"{name}.py reported no target"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert rows, f"{name}.py reported no target"
    printed = re.findall(r"(?m)^target: ", out)
    assert len(printed) == len(rows), f"{name}.py printed {len(printed)} target lines, recorded {len(rows)}"
    for r in rows:
        assert r["script"] == name + ".py" and isinstance(r["holds"], bool), r
        assert r["figure"].strip() and r["target"].strip(), r
        measured = str(r["measured"]).strip()
        words = set(re.findall(r"[a-z/]+", measured.lower()))
        assert measured.lower() not in PLACEHOLDERS and not words & {"nan", "n/a", "failed"}, (
            f"{name}.py: {r['figure']!r} measured nothing: {measured!r}")
        line = f"target: {r['figure']}: {r['target']}; measured {r['measured']}: "
        assert line in out, f"{name}.py recorded {r['figure']!r} without printing its line"
    return out, work, rows


@pytest.mark.parametrize("name", [n for n in run_all.scripts() if n not in DEDICATED])
def test_bench_script_smoke_runs_end_to_end(name, tmp_path):
    smoke(name, tmp_path)


def test_dedicated_smoke_tests_exist():
    assert set(DEDICATED) <= set(run_all.scripts())


def test_loop_speed_smoke_prints_both_cases_and_their_targets(tmp_path):
    """``bench/loop_speed.py --smoke``: both cases run through train.py and the bare loop, and
    the table and targets come out in their shape (no timing is asserted)."""
    out, _, rows = smoke("loop_speed", tmp_path)
    assert "loop speed: train.py vs a bare hybridized Gluon loop" in out
    for case in ("teacher (labels only)", "KD step (quickstart)"):
        row = next(line for line in out.splitlines() if line.startswith(case))
        ours, bare, ratio, verdict = row.split()[-4:]
        assert float(ours) > 0 and float(bare) > 0
        assert re.fullmatch(r"\d+\.\d\d×", ratio) and verdict in ("PASS", "FAIL")
    assert [r["figure"] for r in rows] == ["loop img/s vs bare Gluon loop, teacher (labels only)",
                                           "loop img/s vs bare Gluon loop, KD step (quickstart)"]
    assert all(r["target"] == "≥ 0.9×" and r["measured"].endswith("×") for r in rows)


def test_fashion_bench_without_the_data_fails_with_the_install_line(tmp_path, monkeypatch, capsys):
    """``make bench`` without Debian's dataset-fashion-mnist: a failed line saying how to install
    it and a target that does not hold, not a silent skip (and no training started)."""
    import distill.data.fashion_mnist as fm
    from bench import fashion
    monkeypatch.setattr(fm, "DEFAULT_ROOT", str(tmp_path / "nowhere"))
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("BENCH_RESULTS", str(results))
    assert fashion.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "apt-get install dataset-fashion-mnist" in out
    assert str(tmp_path / "nowhere") in out
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["holds"] is False and "apt-get install dataset-fashion-mnist" in row["measured"]
    # a damaged label file is caught too, not only a missing folder
    root = fashion._smoke.write_fashion(str(tmp_path / "damaged"), n_train=20, n_test=10)
    with open(os.path.join(root, fm.FILES["test_labels"]), "r+b") as f:
        f.truncate(12)
    assert "t10k-labels-idx1-ubyte.gz cannot be read" in fashion.data_missing(root)
    assert fashion.data_missing(fashion._smoke.write_fashion(str(tmp_path / "ok"))) is None


def test_scale_bench_smoke_writes_its_tables_and_results(tmp_path):
    """``bench/scale.py --smoke``: the RSS/speed table per size, the ours-vs-bare table, decode
    throughput for 0, 1 and 2 workers, and ``results.json`` with every figure and its three
    targets (shapes only: no timing is asserted)."""
    out, work, _ = smoke("scale", tmp_path)
    assert re.search(r"(?m)^records +train images +\.rec MiB +peak RSS MiB +vs 200 ", out), out[-3000:]
    assert re.search(r"(?m)^200 .*\n600 ", out)
    assert re.search(r"(?m)^ours \(train\.py, whole epoch\) .* 1\.00×$", out) is None   # ours is a ratio
    assert re.search(r"(?m)^bare Gluon \(\d+ batches after 2\) .* 1\.00×$", out), out[-3000:]
    assert re.search(r"(?m)^decode workers +img/s +img/s per worker", out)
    assert re.search(r"(?m)^scale: (PASS|FAIL) \(\d of 3 targets hold\)", out)
    r = json.loads((work / "results.json").read_text())
    assert r["smoke"] is True and set(r["sizes"]) == {"200", "600"}
    for n in ("200", "600"):
        s = r["sizes"][n]
        assert s["peak_rss_bytes"] > 50 * 2**20 and s["images_per_s"] > 0
        assert 0 < s["train_images"] < int(n) and s["steps"] >= 1
    assert r["bare"]["images_per_s"] > 0 and r["bare"]["timed_steps"] == r["sizes"]["600"]["steps"]
    assert r["bare"]["warmup_steps"] == 2 and r["bare"]["data_source"]
    assert r["speed_ratio"] == pytest.approx(r["sizes"]["600"]["images_per_s"] / r["bare"]["images_per_s"])
    assert r["rss_ratio"] == pytest.approx(r["sizes"]["600"]["peak_rss_bytes"] / r["sizes"]["200"]["peak_rss_bytes"])
    assert [d["workers"] for d in r["decode"]["rows"]] == [0, 1, 2]
    assert all(d["images_per_s"] > 0 for d in r["decode"]["rows"])
    assert [t["target"] for t in r["targets"]] == ["≤ 1.15×", "< 3 GiB each", "≥ 0.9×"]
    for t in r["targets"]:
        assert f"target: {t['figure']}: {t['target']}; measured {t['measured']}: " in out
    # the work folder (records, teacher, recipes, run folders) is removed without --keep
    assert sorted(os.listdir(work)) == ["results.json"]
