# Two commands do all the set-up on a fresh machine:
#   make sample   creates .venv, installs featurebeam with its dev extras, runs the local sample extraction
#   make test     the same set-up, then the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup sample test test-fast bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	bash .ci/install-torch.sh $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,torch]"
	touch $@

setup: $(STAMP)
	bash .ci/setup-system.sh
	bash .ci/setup-emulators.sh $(BIN)/python

sample: setup
	$(BIN)/python -m pipelines.extract --dataset=sample --features=logmel,mfcc,spectral --formats=tfrecord,parquet,tfds --output=runs

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not emulator"

# featurebeam against a bare soundfile + soxr + librosa loop (1 and 2 processes each); see
# benchmarks/compare.py. bench-quick checks the script on tiny corpora.
bench: setup
	$(BIN)/python benchmarks/compare.py --processes_too

bench-quick: setup
	$(BIN)/python benchmarks/compare.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache

# The local BigQuery emulator for `--bigquery_dataset` and `export.query --bigquery_dataset`, in
# the foreground on 127.0.0.1:9050 (Ctrl-C stops it; its tables live in memory until then):
#   export BIGQUERY_EMULATOR_HOST=http://127.0.0.1:9050
.PHONY: bq-emulator
bq-emulator: $(STAMP)
	bash .ci/setup-emulators.sh $(BIN)/python
	BQEMU_ENABLE_FORMAT_EXTENSIONS=false BQEMU_UPLOAD_STAGING_DIR=$${TMPDIR:-/tmp}/featurebeam-bqemulator \
		$(BIN)/bqemulator start --ephemeral --rest-port 9050 --grpc-port 9060 --project featurebeam-local
