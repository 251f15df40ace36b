# Set-up and the two everyday jobs. Every target installs what it needs first and
# is safe to run again: the virtualenv is built once (a stamp file records it) and
# rebuilt only when pyproject.toml changes.
#
#   make run    # set up, then prune LeNet-5 on Fashion-MNIST end to end (pnp-pipeline)
#   make test   # set up, then run the test suite (what CI runs)
#
# Extra pipeline overrides: make run ARGS="finetune.epochs=3 out_dir=runs/mine"

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pnp-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: all setup data run test clean-runs

all: run

setup: $(STAMP)

# torch and torchvision first, pinned: they come from the machine's local package
# store; then pnp itself with its training, export and test extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[train,export,test]"
	touch $(STAMP)

# detectron2 for pnp.detection (object detection), after the base set-up: the
# pb1-detectron2 sdist's Python sources with pnp.detection.compat standing in for
# its missing compiled ops. A detectron2 built from source is kept as it is.
DETECTRON2_STAMP := $(VENV)/.pnp-detectron2-installed

.PHONY: setup-detection

setup-detection: $(DETECTRON2_STAMP)

$(DETECTRON2_STAMP): $(STAMP) pnp/detection/install.py
	$(BIN)/python -m pnp.detection.install
	touch $(DETECTRON2_STAMP)

# Real Fashion-MNIST, from the Debian package (needs root; otherwise say what to do).
data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or pass ARGS=data.root=<folder with the four IDX files>" >&2; \
		exit 1; \
	fi

run: setup data
	$(BIN)/pnp-pipeline $(ARGS)

test: setup setup-detection
	$(BIN)/python -m pytest -q -m "not slow"

clean-runs:
	rm -rf runs
