# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv and install into it
# (-qq: pip's errors only; setuptools' notes about editable installs are not for the user).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vesl-installed
EXTRAS ?= dev,ray,beam
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-full test test-matrix test-slow lint bench install browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq -U pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -qq torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -qq 'torch>=2.4,<2.15' 'torchvision>=0.19,<0.30'
	$(BIN)/pip install -qq -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/vesl demo

demo-full: $(STAMP)
	$(BIN)/vesl demo --full

# Debian's chromium for the headless gallery test (root only; otherwise that one test is skipped).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  timeout 300 sh -c 'apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)'; } \
	  || echo "chromium not installed: the headless-browser gallery test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not benchmark"

# The numeric and engine tests under other CPUs' kernels and thread counts (not part of `make test`; run it
# before you stop whenever you touch numerics). `native` is this machine's own kernels. MATRIX_TESTS=tests
# runs the whole suite in every cell.
MATRIX_TESTS ?= $(addprefix tests/,test_boxes.py test_labels_validate.py test_detectors.py test_captioners.py \
	test_keep_captions.py test_engines.py test_local_engine.py test_crash_resume.py test_writer.py \
	test_loss_balance.py test_pretrain_losses.py test_pretrain_train.py test_train_defaults.py \
	test_grounding_learns.py test_step_syncs.py test_hf_export.py test_refexp.py test_demo.py test_synth.py)
test-matrix: $(STAMP)
	@fail=""; for cap in default avx2 native; do for t in 1 2; do \
	  echo "== ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$t"; \
	  if [ $$cap = native ]; then run="env -u ATEN_CPU_CAPABILITY"; else run="env ATEN_CPU_CAPABILITY=$$cap"; fi; \
	  $$run OMP_NUM_THREADS=$$t $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not benchmark" $(MATRIX_TESTS) \
	    || fail="$$fail $$cap/$$t"; \
	done; done; \
	if [ -n "$$fail" ]; then echo "test-matrix: failed in$$fail"; exit 1; else echo "test-matrix: every cell passed"; fi

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
