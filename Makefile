# Two commands do everything, each setting itself up on a fresh machine:
#   make train   train the report's model on CIFAR-10 with the default settings
#   make test    lint (ruff) and run the test suite (2 worker processes, a test file per worker at a time)
# Both create .venv and install the package into it in editable mode with its test
# extra (pyproject.toml); editing pyproject.toml makes the next command reinstall.
# CIFAR-10 is read from $NFNET_DATA_DIR (a folder holding cifar-10-batches-py/)
# when set, else downloaded through TensorFlow Datasets.
# Extra arguments: make train ARGS="--recipe fast", make test ARGS="-m 'not slow'".

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
ARGS ?=

.PHONY: install train test lint tune tensorboard benchmarks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

train: $(STAMP)
	$(BIN)/python -m nfnet_keras.fit $(ARGS)

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

tune: $(STAMP)
	$(BIN)/python -m nfnet_keras.tuner.grid $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

benchmarks: $(STAMP)
	$(BIN)/python -m benchmarks.bn_baseline
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.peak --actions baseline,bf16
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.serving

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
