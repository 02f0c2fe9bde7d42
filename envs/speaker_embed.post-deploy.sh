#!/usr/bin/env bash
# Run by Snakemake inside the new conda env (see speaker_embed.yaml): resemblyzer without its webrtcvad pin.
set -euo pipefail
python -m pip install --no-deps resemblyzer==0.1.4
