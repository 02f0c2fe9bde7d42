#!/usr/bin/env bash
# The GPU device check (bench/device_check.py says what it measures), ready to run unchanged on a machine with
# one NVIDIA GPU, Python 3.12 and torch, where nothing can be downloaded:
#
#   bash bench/device_check.sh images     # carried: .whl-images (sku, its profile, probe: benchmarks, real runs)
#   bash bench/device_check.sh speech     # carried: .whl-speech (speaker: benchmark and real run)
#   bash bench/device_check.sh video      # carried: .whl-video  (NVDEC against the CPU decoders)
#   bash bench/device_check.sh nvcodec    # carried: .whl-nvcodec (PyNvVideoCodec against the CPU decoders)
#   bash bench/device_check.sh --dry-run  # here, on the CPU, with .venv: tiny sizes, the same steps
#
# bench/device_wheels.sh fetches the four wheel sets (each packed as one wheels.tar.xz, unpacked here first; each
# must travel with the tree under the 64 MiB a call carries, so the check runs as four calls; each part runs
# alone, on a fresh machine too). Wheels go to $SITE (/tmp/site), on PYTHONPATH; the steps work in $WORK
# (/tmp/device_check); to $OUT (or results/device_check) go <part>-device_check.json, <part>-gpu_table.md and
# <part>.tgz (every step's figures and log): three files, as a device call brings back; <part>-device_check.json
# is written after every step (`"finished": false` until the last), so a call cut short keeps what it measured. The
# dry run writes its files to $OUT as they are.
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
site=${SITE:-/tmp/site}
if [ -d "$wheels" ]; then
  files=("$wheels"/*.whl)
  if [ -f "$wheels/wheels.tar.xz" ]; then  # as bench/device_wheels.sh packs a set
    rm -rf "/tmp/wheels-$part"
    "$python" bench/wheelset.py unpack "$wheels" "/tmp/wheels-$part" || exit 1
    files=("/tmp/wheels-$part"/*.whl)
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${files[@]}" || { echo "installing the wheels of $wheels failed" >&2; exit 1; }
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$site/bin:$PATH
else
  echo "no $wheels here: using what is installed" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found" >&2
case "$part" in
  images) parts=(sku profile probe run_images); budget=${BUDGET:-480} ;;
  speech) parts=(speaker run_speech); budget=${BUDGET:-240} ;;
  video) parts=(video); budget=${BUDGET:-180} ;;
  nvcodec) parts=(nvcodec); budget=${BUDGET:-180} ;;
  *) echo "unknown part $part (images, speech, video, nvcodec or --dry-run)" >&2; exit 2 ;;
esac
work=${WORK:-/tmp/device_check}/$part  # the steps' files (the real runs' data among them) stay on the machine
mkdir -p "$work"
# the figures so far go to $OUT after every step: a call cut short at its time limit still brings them back
PYTHONUNBUFFERED=1 "$python" bench/device_check.py --parts "${parts[@]}" --budget "$budget" --out "$work" \
  --partial "$out/$part-device_check.json" "${@:2}"
status=$?
# what comes back from a device machine is a few files at most: the figures, the table, and one archive with every
# step's figures and log and the real runs' shard stats and job logs (not their data)
(cd "$work" && { find . -path ./run -prune -o -path ./run_speech -prune -o -type f -print
  find run run_speech \( -name stats.json -o -name '*.log' \) -type f 2>/dev/null; } | tar czf "$out/$part.tgz" -T -)
for name in device_check.json gpu_table.md; do
  [ -f "$work/$name" ] && cp "$work/$name" "$out/$part-$name"
done
exit $status
