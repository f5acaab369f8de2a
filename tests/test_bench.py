"""`make bench`'s collector: every script's targets in one table, failures included."""
import os
import sys

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
