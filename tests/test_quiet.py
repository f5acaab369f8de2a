"""A clean log: MXNet's C++ executor lines and Gluon's warnings stay off the terminal; ``--debug``
shows them; any other line written to stderr during a captured call still reaches the user."""
import os
import subprocess
import sys

from helpers import ROOT, run_cli, tiny_student, tiny_teacher

_BIND = """
import os, sys
import mxnet as mx
from distill.quiet import configure, native_stderr
configure(debug=sys.argv[1] == "debug")
os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
x = mx.sym.var("data")
y = mx.sym.Activation(x, act_type="relu")
with native_stderr():
    y.simple_bind(mx.cpu(), data=(1, 4))
    os.write(2, b"a line of the user's own\\n")
print("bound")
"""


def _bind(mode):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MXNET_SUBGRAPH_BACKEND", None)
    return subprocess.run([sys.executable, "-c", _BIND, mode], capture_output=True, text=True,
                          env=env, timeout=120)


def test_mxnet_executor_line_is_kept_off_and_other_lines_replayed():
    quiet, debug = _bind("quiet"), _bind("debug")
    assert quiet.returncode == 0 and debug.returncode == 0, quiet.stderr + debug.stderr
    noise = "MXNET_SUBGRAPH_BACKEND=NONE is detected"
    assert noise in debug.stderr                    # the line MXNet writes, shown with --debug
    assert noise not in quiet.stderr
    assert "a line of the user's own" in quiet.stderr and "bound" in quiet.stdout


def test_gluon_warnings_only_with_debug(tmp_path):
    t = tiny_teacher(tmp_path, epochs=1)
    s = tiny_student(tmp_path, t, name="quiet", epochs=1, output={"latency": False})
    res = run_cli(s)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "epoch 1/1" in out                                    # the tool's own lines stay
    assert "is not used by any computation" not in out and "UserWarning" not in out
    res = run_cli(s, "--debug", "--set", "output.dir=" + str(tmp_path / "runs" / "quiet_debug"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is not used by any computation" in res.stdout + res.stderr
