# Two commands do everything, each setting itself up on a fresh machine:
#   make train   train the report's model on CIFAR-10 with the default settings
#   make test    run the test suite
# CIFAR-10 is read from $NFNET_DATA_DIR (a folder holding cifar-10-batches-py/)
# when set, else downloaded through TensorFlow Datasets.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
ARGS ?=

.PHONY: install train test tune tensorboard benchmarks clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

train: $(STAMP)
	$(BIN)/python -m nfnet_keras.fit $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

tune: $(STAMP)
	$(BIN)/python -m tuner.grid $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

benchmarks: $(STAMP)
	$(BIN)/python -m benchmarks.bn_baseline
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.peak --actions baseline,bf16
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.serving

clean:
	rm -rf $(VENV) .pytest_cache
