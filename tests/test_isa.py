"""oneDNN's instruction set can be capped (``DNNL_MAX_CPU_ISA``), and ``make test`` reruns the
int8, QAT and teacher-cache tests (marker ``isa``) under ``DNNL_MAX_CPU_ISA=AVX2``, so an AVX-512
host checks the AVX2 kernels too. This checks that the variable reaches oneDNN (MXNet 1.9.1's
bundled oneDNN reads ``DNNL_MAX_CPU_ISA``; ``ONEDNN_MAX_CPU_ISA`` it ignores)."""
import os
import re
import subprocess
import sys

import pytest

_CONV = ("import mxnet as mx\n"
         "x = mx.nd.ones((1, 3, 8, 8)); w = mx.nd.ones((4, 3, 3, 3))\n"
         "mx.nd.Convolution(x, w, kernel=(3, 3), num_filter=4, no_bias=True).wait_to_read()\n")


def onednn_isa(cap=None):
    """The ISA oneDNN reports (``DNNL_VERBOSE``'s info line) in a child process, and the
    implementations of the primitives it ran; ``cap`` sets ``DNNL_MAX_CPU_ISA`` (None: as
    inherited)."""
    env = dict(os.environ, DNNL_VERBOSE="1", OMP_NUM_THREADS="1")
    if cap is not None:
        env["DNNL_MAX_CPU_ISA"] = cap
    res = subprocess.run([sys.executable, "-c", _CONV], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    isa = re.search(r"dnnl_verbose,info,cpu,isa:(.*)", res.stdout)
    assert isa, res.stdout[-2000:]
    impls = re.findall(r"dnnl_verbose,exec,cpu,convolution,([^,]+),", res.stdout)
    return isa.group(1).strip(), impls


def test_dnnl_max_cpu_isa_takes_effect():
    native, _ = onednn_isa("")
    sse, sse_impls = onednn_isa("SSE41")
    assert "SSE4.1" in sse and sse != native, (native, sse)
    assert sse_impls and not any("avx" in i for i in sse_impls), sse_impls
    avx2, impls = onednn_isa("AVX2")
    assert "512" not in avx2 and "AVX" in avx2, avx2
    assert impls and not any("avx512" in i for i in impls), impls


@pytest.mark.isa
def test_the_isa_this_pass_runs_under():
    """Under ``make test``'s second pass (``DNNL_MAX_CPU_ISA=AVX2``), oneDNN really runs AVX2
    kernels; natively it reports the host's ISA. Either way the kernels named are that ISA's."""
    isa, impls = onednn_isa()
    cap = os.environ.get("DNNL_MAX_CPU_ISA", "").upper()
    if cap == "AVX2":
        assert "512" not in isa and "AVX" in isa, isa
        assert not any("avx512" in i for i in impls), impls
    print(f"oneDNN ISA: {isa} (DNNL_MAX_CPU_ISA={cap or 'unset'}); convolutions: {sorted(set(impls))}")
