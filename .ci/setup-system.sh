#!/usr/bin/env bash
# System packages the project needs beyond Python: ffmpeg (fallback decoder for AAC/M4A).
set -euo pipefail
if command -v ffmpeg >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
elif command -v sudo >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
else
  echo "featurebeam: ffmpeg is missing; install it (apt-get install ffmpeg) for AAC/M4A decoding" >&2
  exit 1
fi
