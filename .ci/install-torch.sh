#!/usr/bin/env bash
# CPU-only PyTorch for featurebeam[torch] (export.load_torch), installed before the extra so that pip
# finds `torch` satisfied: the default Linux wheel on PyPI pulls some 3 GB of CUDA libraries that a
# CPU machine never uses. Order: torch already importable; a CPU wheel in pip's --find-links folder
# (PIP_FIND_LINKS); PyTorch's CPU index; else the extra's plain `torch` requirement decides.
# Usage: bash .ci/install-torch.sh .venv/bin/python
set -uo pipefail
python="${1:-python3}"
if "$python" -c "import torch" >/dev/null 2>&1; then
  exit 0
fi
for folder in ${PIP_FIND_LINKS:-}; do
  wheel=$(ls "$folder"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -1)
  if [ -n "$wheel" ] && "$python" -m pip install --quiet "$wheel"; then
    exit 0
  fi
done
if "$python" -m pip install --quiet --retries 0 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
  exit 0
fi
echo "featurebeam: no CPU-only torch wheel reachable; pip installs the [torch] extra's default build" >&2
exit 0
