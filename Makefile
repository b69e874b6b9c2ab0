# Two fresh-machine commands (see README): `make profile` (the main job) and `make test`.
# Each creates its own virtual environment in .venv and pins torch (CPU wheel on CPU machines).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
LIGHTNING_VERSION ?= 2.6.6
TRANSFORMERS_VERSION ?= 5.24.0
ACCELERATE_VERSION ?= 1.15.0
SKLEARN_VERSION ?= 1.9.1
STAMP := $(VENV)/.installed-$(TORCH_VERSION)-$(TRITON_VERSION)-$(LIGHTNING_VERSION)-$(TRANSFORMERS_VERSION)-$(SKLEARN_VERSION)

.PHONY: profile test lint install study peers clean

# The peer EMA libraries of tests/test_migration.py are pinned; the two that would pull another torch
# (mmengine: opencv-python and matplotlib; timm: torchvision, which has no build for the CPU torch) are
# installed without their dependencies, timm outside site-packages: the test loads its utils/model_ema.py.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" "triton==$(TRITON_VERSION)" numpy "pytest>=8" "ruff==0.14.0" \
		"scikit-learn==$(SKLEARN_VERSION)" "setuptools>=69" wheel "pybind11>=2.12" \
		"lightning==$(LIGHTNING_VERSION)" "transformers==$(TRANSFORMERS_VERSION)" "accelerate==$(ACCELERATE_VERSION)" "peft==0.21.2" \
		"ema-pytorch==0.8.3" "torch-ema==0.3" "diffusers==0.42.1"
	$(BIN)/pip install --quiet --no-deps "mmengine==0.10.7" "addict==2.4.0" "yapf==0.43.0" "termcolor==3.3.0" \
		"platformdirs==4.14.9" "opencv-python-headless==5.0.0.93"
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/peers "timm==1.0.31"
	touch $(STAMP)

# Builds the optional extension in place (setup.py prints why it skips a part).
install: $(STAMP)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .

# The main job: a bandwidth profile of the EMA ops on the built-in ResNet-50 parameter set.
profile: install
	$(BIN)/sema-bench --set resnet50 --json bench/results/latest-profile.json

# The effectiveness study (bench/effectiveness/README.md): about 15 minutes on a 2-core CPU.
study: install
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" scikit-learn matplotlib tqdm
	$(BIN)/python -m bench.effectiveness

# sema against the EMA libraries people use (bench/peers.py), all on this machine.
peers: install
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" ema-pytorch torch-ema diffusers matplotlib tqdm
	$(BIN)/python bench/peers.py --json bench/results/latest-peers.json --plot bench/results/latest-peers.png

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info sema/_C*.so
