"""``bench/loop_speed.py --smoke``: both cases run through train.py and the bare loop, and the
table and targets come out in their shape (no timing is asserted: the figures live in bench/)."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loop_speed_smoke_prints_both_cases_and_their_targets(tmp_path):
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "loop_speed.py"), "--smoke",
                          "--out", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "loop speed: train.py vs a bare hybridized Gluon loop" in out
    for case in ("teacher (labels only)", "KD step (quickstart)"):
        row = next(line for line in out.splitlines() if line.startswith(case))
        ours, bare, ratio, verdict = row.split()[-4:]
        assert float(ours) > 0 and float(bare) > 0
        assert re.fullmatch(r"\d+\.\d\d×", ratio) and verdict in ("PASS", "FAIL")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["figure"] for r in rows] == ["loop img/s vs bare Gluon loop, teacher (labels only)",
                                           "loop img/s vs bare Gluon loop, KD step (quickstart)"]
    assert all(r["target"] == "≥ 0.9×" and r["measured"].endswith("×") for r in rows)
