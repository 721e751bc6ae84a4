# kdcurate: the two set-up commands are `make demo` and `make test`; both build .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv data demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q -e '.[dev,demo,ray,cloud,teachers,imagenet]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import torch, torchvision, faiss, duckdb, webdataset, typer, curate, distill"
	touch $(STAMP)

# Debian's Fashion-MNIST: installed when missing and we are root; otherwise the demo falls back to digits.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	    echo "note: could not install dataset-fashion-mnist; falling back to the built-in digits"; \
	  else \
	    echo "note: Fashion-MNIST missing (run 'apt-get install dataset-fashion-mnist' as root); falling back to digits"; \
	  fi; \
	fi

# the demo job: pipelines/demo.toml on Fashion-MNIST, pipelines/demo-digits.toml where it is missing
demo: venv data
	@if [ -f $(FMNIST) ]; then $(BIN)/pipeline run pipelines/demo.toml; \
	 else echo "Fashion-MNIST is not installed: running the digits demo"; $(BIN)/pipeline run pipelines/demo-digits.toml; fi

test: venv data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv data
	$(BIN)/python benchmarks/score_throughput.py
	$(BIN)/python benchmarks/query.py
	$(BIN)/python benchmarks/export_throughput.py
	$(BIN)/python benchmarks/distill_throughput.py
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/relatedness.py --phase scores
	$(BIN)/python benchmarks/relatedness.py --phase students --seeds 2 --long fashion

clean:
	rm -rf $(VENV) work
