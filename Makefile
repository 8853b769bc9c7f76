# Two commands: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch. On this kind of machine pip's configured find-links holds the wheel;
# a plain `torch` requirement would pull several GB of CUDA packages instead.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup browser demo test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: keeping pip's default torch build"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[train,cpu,serve,dev]'
	touch $(STAMP)

setup: $(STAMP) browser

# The browser test of `mtl-edge serve` drives Debian's chromium through its chromedriver;
# nothing downloads a browser of its own.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian chromium and chromium-driver for the browser test"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends chromium chromium-driver; \
		else \
			echo "chromium/chromedriver missing and no root apt-get: the browser test skips"; \
		fi; \
	fi

demo: setup
	$(VENV)/bin/mtl-edge demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
