# Two commands do all the set-up on a fresh machine:
#   make sample   creates .venv, installs featurebeam alone (no test tools, no emulators, no system
#                 packages) and runs the local sample extraction
#   make test     installs everything (test tools, CPU PyTorch, ffmpeg, the emulators), then the whole
#                 test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SAMPLE_STAMP := $(VENV)/.installed
DEV_STAMP    := $(VENV)/.installed-dev

.PHONY: setup sample test test-fast bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(SAMPLE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	bash .ci/install-torch.sh $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,torch]"
	touch $@ $(SAMPLE_STAMP)

setup: $(DEV_STAMP)
	bash .ci/setup-system.sh
	bash .ci/setup-emulators.sh $(BIN)/python

# ffmpeg decodes only AAC/M4A, which the sample has none of: a note, not an install.
sample: $(SAMPLE_STAMP)
	@command -v ffmpeg >/dev/null 2>&1 || echo "featurebeam: note: ffmpeg is not installed; only AAC/M4A files need it (apt-get install ffmpeg)"
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
bq-emulator: $(DEV_STAMP)
	bash .ci/setup-emulators.sh $(BIN)/python
	BQEMU_ENABLE_FORMAT_EXTENSIONS=false BQEMU_UPLOAD_STAGING_DIR=$${TMPDIR:-/tmp}/featurebeam-bqemulator \
		$(BIN)/bqemulator start --ephemeral --rest-port 9050 --grpc-port 9060 --project featurebeam-local
