# `make demo` and `make test` each set up what they need on a fresh machine, then run.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install data demo test lint clean

install:
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (never downloaded by code),
# or from a folder of its IDX files: make demo DATA_ROOT=/path/to/idx (no root needed).
DATA_ROOT ?=

data:
	@if [ -n "$(DATA_ROOT)" ]; then \
		echo "Fashion-MNIST: $(DATA_ROOT)"; \
	elif dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "Fashion-MNIST: installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'" \
		     "or pass DATA_ROOT=<folder holding its IDX files>."; exit 1; \
	fi

demo: install data
	$(PY) jobs/train.py $(if $(DATA_ROOT),data.root=$(DATA_ROOT))

# two pytest-xdist workers: the tests that start Ray run one after another in one of them
# (tests/conftest.py), everything else in both
test: install data
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint:
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache build *.egg-info
