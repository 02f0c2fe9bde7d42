#!/usr/bin/env bash
# Fetch, here, the wheels bench/device_check.sh installs on the GPU machine (Python 3.12, x86_64; the machine
# has torch, torchvision, torchaudio, numpy, pandas, pyarrow, pillow, opencv, scipy, timm, aiohttp ... already,
# and reaches no package index). Two sets, each small enough for one call's 64 MiB with the working tree:
#   .whl-images  snakemake, its interfaces and needs (not PuLP: the check runs --scheduler greedy), jsonschema,
#                open_clip, faiss-cpu, resemblyzer, speechbrain, soundfile, librosa, the LLM client's limits
#   .whl-video   PyAV (its FFmpeg has NVDEC and libx264) and decord
# Versions are constraints.txt's. Both folders are git-ignored (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl-\*/" .git/info/exclude 2>/dev/null || echo "/.whl-*/" >> .git/info/exclude
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
fetch .whl-images snakemake snakemake-interface-common snakemake-interface-executor-plugins \
  snakemake-interface-logger-plugins snakemake-interface-report-plugins snakemake-interface-scheduler-plugins \
  snakemake-interface-storage-plugins argparse-dataclass conda-inject ConfigArgParse docutils dpath GitPython gitdb \
  smmap humanfriendly immutables jsonschema jsonschema-specifications referencing rpds-py nbformat fastjsonschema \
  jupyter_core smart_open throttler yte open_clip_torch ftfy wcwidth faiss-cpu Resemblyzer webrtcvad-wheels \
  speechbrain hyperpyyaml ruamel.yaml ruamel.yaml.clib soundfile librosa audioread lazy-loader pooch soxr \
  aiolimiter tenacity platformdirs traitlets decorator sqlmodel SQLAlchemy greenlet pydantic pydantic_core \
  annotated-types typing-inspection cffi pycparser
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
  -d .whl-images "connection_pool==0.0.2"  # snakemake's; 0.0.3 (constraints.txt) has no wheel
fetch .whl-video av decord
du -sh .whl-images .whl-video
