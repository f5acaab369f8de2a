"""``make bench``: run every script in ``bench/`` and print one table of what each promises.

Each script runs in its own process (its output streamed as it comes), reports its figures
through :func:`bench.targets.target`, and the table at the end lists, per figure: the script,
the target, the measured value and whether it holds. A script that fails is a row too.

    .venv/bin/python bench/run_all.py                  # every script (accuracy benches: an hour)
    .venv/bin/python bench/run_all.py int8 export      # some of them
    .venv/bin/python bench/run_all.py --list
    .venv/bin/python bench/run_all.py --smoke          # each script's --smoke: seconds, in temporary folders
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distill.report import format_table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_BENCHES = {"targets.py", "run_all.py", "peers.py", "peers_torch.py"}  # peers: make bench-peers (torch)


def scripts():
    """The bench scripts, by name (``int8`` for ``bench/int8.py``)."""
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))
                  if os.path.basename(p) not in NOT_BENCHES and not os.path.basename(p).startswith("_"))


def run_script(name, results, args=()):
    """Run ``bench/NAME.py ARGS``; return (exit code, seconds)."""
    t0 = time.time()
    env = dict(os.environ, BENCH_RESULTS=results, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, name + ".py"), *args], cwd=ROOT, env=env)
    return proc.returncode, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="scripts to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the scripts and exit")
    p.add_argument("--smoke", action="store_true",
                   help="pass --smoke to every script: its whole code path on tiny data in a temporary "
                        "folder, in seconds (bench/_smoke.py; the figures mean nothing)")
    args = p.parse_args(argv)
    names = scripts()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"unknown bench script(s): {', '.join(unknown)}; scripts: {', '.join(names)}", file=sys.stderr)
        return 2
    chosen = args.names or names
    fd, results = tempfile.mkstemp(prefix="bench-", suffix=".jsonl")
    os.close(fd)
    status = {}
    try:
        for i, name in enumerate(chosen):
            print(f"\n######## bench {i + 1}/{len(chosen)}: {name}.py", flush=True)
            status[name] = run_script(name, results, ["--smoke"] if args.smoke else [])
            print(f"######## {name}.py: exit {status[name][0]} in {status[name][1]:.0f} s", flush=True)
        with open(results) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    finally:
        os.remove(results)
    table = []
    for name in chosen:
        mine = [r for r in rows if r["script"] == name + ".py"]
        code, secs = status[name]
        for r in mine:
            table.append([name, r["figure"], r["target"], r["measured"], "yes" if r["holds"] else "NO"])
        if code != 0:
            table.append([name, f"(script failed: exit {code} after {secs:.0f} s)", "", "", "NO"])
        elif not mine:
            table.append([name, f"(no target checked; {secs:.0f} s)", "", "", "-"])
    print(format_table(["script", "figure", "target", "measured", "holds"], table,
                       title="\nmake bench: every target of every bench script"
                             + (" (--smoke: tiny runs, the figures mean nothing)" if args.smoke else "")))
    held = sum(r[-1] == "yes" for r in table)
    checked = sum(r[-1] in ("yes", "NO") for r in table)
    print(f"{held} of {checked} hold")
    return 0 if held == checked else 1


if __name__ == "__main__":
    sys.exit(main())
