# The two commands a fresh machine runs: `make demo` and `make test`.
# Both build their own virtualenv (.venv): the machine's numpy is 2.x, mxnet 1.9.1 needs <1.24.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

# pnnx (ONNX -> ncnn for `distill export`) is a self-contained binary: --no-deps, since the
# torch it declares is only needed for PyTorch input.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps pnnx
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) train.py recipes/quickstart.yaml

# two test processes, one OpenMP thread each for in-process work: most tests are short MXNet
# runs whose single-threaded parts (graph set-up, subprocess start-up) dominate, so two processes
# finish sooner than one with two threads (training subprocesses keep two threads: see run_cli)
# then the int8 / QAT / teacher-cache tests (marker `isa`) again with oneDNN capped at AVX2, so an
# AVX-512 host checks the AVX2 kernels too (tests/test_isa.py checks the cap takes effect); on a
# host whose oneDNN already runs AVX2 or less, the first pass was that run
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2
	@isa=$$(PYTHONPATH=tests $(PY) -c 'from test_isa import onednn_isa; print(onednn_isa()[0])'); \
	case "$$isa" in *512*|*AMX*) echo "oneDNN runs $$isa here: the isa tests again under DNNL_MAX_CPU_ISA=AVX2"; \
	  DNNL_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m isa ;; \
	  *) echo "oneDNN runs $$isa here: the isa tests above already ran on AVX2 kernels or below" ;; esac

clean:
	rm -rf $(VENV) runs

# every bench script, one table of figures and targets at the end (accuracy benches: about an hour)
bench: $(STAMP)
	$(PY) bench/run_all.py

# Torch-Pruning + KD vs ours on the same networks, every result timed in ncnn (bench/peers.py,
# under an hour on 2 cores). torch gets its own virtualenv: gluoncv 0.10 refuses to import beside
# torch >= 2, and the main install stays lean (make test never installs torch). torch==2.13.0 is
# the CPU wheel (plain `torch` pulls a CUDA build of several GB), installed before torch-pruning,
# whose `torch>=2.0` it then meets; onnx for torch.onnx.export, numpy pinned as in pyproject.toml.
# The weight-copy test runs first (PEERS_REQUIRED: it fails instead of skipping).
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q torch==2.13.0
	$(PEERS_PY) -m pip install -q torch-pruning==1.6.1 'numpy>=1.21,<1.24' onnx==1.15.0 'protobuf<5'
	touch $(PEERS_STAMP)

.PHONY: bench-peers
bench-peers: $(STAMP) $(PEERS_STAMP)
	PEERS_REQUIRED=1 PEERS_PYTHON=$(PEERS_PY) OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_peers.py
	PEERS_PYTHON=$(PEERS_PY) $(PY) bench/peers.py
