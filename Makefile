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
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs

# every bench script, one table of figures and targets at the end (accuracy benches: about an hour)
bench: $(STAMP)
	$(PY) bench/run_all.py
