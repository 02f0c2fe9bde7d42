#!/usr/bin/env bash
# The GPU device check (bench/device_check.py says what it measures), ready to run unchanged on a machine with
# one NVIDIA GPU, Python 3.12 and torch, where nothing can be downloaded:
#
#   bash bench/device_check.sh images     # carried: .whl-images (sku, its profile, probe: benchmarks, real runs)
#   bash bench/device_check.sh speech     # carried: .whl-speech (speaker: benchmark and real run)
#   bash bench/device_check.sh video      # carried: .whl-video  (NVDEC against the CPU decoders)
#   bash bench/device_check.sh --dry-run  # here, on the CPU, with .venv: tiny sizes, the same steps
#
# bench/device_wheels.sh fetches the three wheel sets (each must travel with the tree under the 64 MiB a call
# carries, so the check runs as three calls; each part runs alone, on a fresh machine too). Wheels go to
# /tmp/site, on PYTHONPATH; figures go to $OUT (or results/device_check): device_check.json, gpu_table.md and a
# log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-images}
out=${OUT:-results/device_check}
mkdir -p "$out"
if [ "$part" = "--dry-run" ]; then
  exec "${PYTHON:-.venv/bin/python}" bench/device_check.py --dry-run --out "$out" "${@:2}"
fi
python=${PYTHON:-python3}
wheels=".whl-$part"
if [ -d "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
else
  echo "no $wheels here: using what is installed" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found" >&2
case "$part" in
  images) parts=(sku profile probe run_images); budget=${BUDGET:-480} ;;
  speech) parts=(speaker run_speech); budget=${BUDGET:-240} ;;
  video) parts=(video); budget=${BUDGET:-180} ;;
  *) echo "unknown part $part (images, speech, video or --dry-run)" >&2; exit 2 ;;
esac
PYTHONUNBUFFERED=1 exec "$python" bench/device_check.py --parts "${parts[@]}" --budget "$budget" --out "$out/$part" \
  "${@:2}"
