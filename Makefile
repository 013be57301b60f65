# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# What a run imports from torch (an optimizer's first step imports torch._dynamo),
# then the rest of what a run, a sweep and the tests import.
COMPILE_TORCH := import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
COMPILE_TORCH_SIDE := import matplotlib.pyplot, hydra, pytest, xdist, nanlab.cli, nanlab.lab.runner, nanlab.reports.figures
# Each framework is optional: one that fails to import is the tests' to report.
COMPILE_OTHER_SIDE := import importlib; [importlib.import_module(m) for m in \
	("tensorflow", "jax", "keras", "hypothesis", "submitit", "joblib", "scipy")]

.PHONY: install demo test bench claims docs clean

install: $(STAMP)

# torch is pinned first: 2.13.0 resolves to the local CPU wheel, while an unpinned
# torch would pull a multi-GB CUDA build. The venv keeps Hydra's antlr pin away
# from the machine's own packages.
#
# Byte-compiling: with PYTHONDONTWRITEBYTECODE set (as on these machines), a venv
# without .pyc files recompiles torch and TensorFlow in every process. pip compiles
# every file it installs, one after another (about 100 s); runs import about 40% of
# them. So pip compiles nothing, and imports of what runs import write those .pyc
# files (33 s of CPU): torch's while pip installs the rest (pip keeps one core busy),
# then the rest on both cores. A module first imported later is compiled where it is
# imported, as without a venv.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile torch==2.13.0
	# The launchers and every framework (framework=keras-*|jax) are optional extras for
	# users; the tests cover each one, so they all go in here.
	PYTHONDONTWRITEBYTECODE= $(PY) -c '$(COMPILE_TORCH)' 2>/dev/null & \
	$(PY) -m pip install -q --no-compile -e '.[test,parallel,cluster,keras,jax,tensorflow,search]'; \
	installed=$$?; wait; exit $$installed
	PYTHONDONTWRITEBYTECODE= $(PY) -c '$(COMPILE_TORCH_SIDE)' & \
	PYTHONDONTWRITEBYTECODE= TF_CPP_MIN_LOG_LEVEL=3 $(PY) -c '$(COMPILE_OTHER_SIDE)' >/dev/null 2>&1; wait
	touch $(STAMP)

demo: install
	$(PY) -m nanlab scenario=softmax_overflow

# Every framework is installed above, so a missing one fails its tests rather than skipping.
# One thread per process: workers on few cores, each on torch's default count, spin
# against each other (tests/conftest.py sets the same for what pytest starts). Three
# workers on two cores take the same time as two on an idle machine (473 s against
# 465 s) and a larger share of a busy one (1.57x the idle time beside two CPU-bound
# processes, where two workers took 2.04x).
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NANLAB_REQUIRE_FRAMEWORKS=1 $(PY) -m pytest -q -n 3 --durations=15

claims: install
	$(PY) -m nanlab mode=claims

docs: install
	$(PY) docs/make_scenario_docs.py
	$(PY) docs/make_framework_table.py

bench: install
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/tracer_overhead.py
	$(PY) benchmarks/kernel_check.py
	$(PY) benchmarks/frameworks.py

clean:
	rm -rf $(VENV) outputs multirun build dist *.egg-info .pytest_cache
