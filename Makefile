# Two entry points on a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv
# and install the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint check-kernels bench clean

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.version.cuda is None or torch.cuda.is_available(), 'a CUDA torch build was installed on a machine without a GPU'"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/attention_pool.py --quick

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

check-kernels: $(STAMP)
	$(PY) -m cvg.kernels.check

bench: $(STAMP)
	$(PY) benchmarks/attention_pool.py --write benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) build *.egg-info
