#!/usr/bin/env bash
# Flowline against its peer, diffusers' FluxPipeline, on this machine: the same FLUX.1-schnell
# snapshot (real widths, few blocks, random weights), the same prompt and the same starting
# noise, 4 steps at 512² and 1024², the two programs alternating REPEATS times. Prints a table
# of load, encode, sample, decode, end-to-end time and peak memory, the PSNR between the two
# programs' images, and last `end-to-end ratio flowline/diffusers: X.XX` (median at 512²).
#
# Set-up is its own: a Python virtual environment with torch and diffusers from the package
# registry (PyPI's torch brings about 3 GB of CUDA libraries, unused here), and the snapshot
# (about 3 GB), both kept under TWIN_DIR for later runs.
#
#   bash bench/diffusers-twin.sh                 # 512² and 1024², 3 runs each
#   SIZES="512" REPEATS=1 bash bench/diffusers-twin.sh
set -euo pipefail

repository="$(cd "$(dirname "$0")/.." && pwd)"
twin_dir="${TWIN_DIR:-$HOME/.cache/flowline/diffusers-twin}"
sizes="${SIZES:-512 1024}"
repeats="${REPEATS:-3}"
venv="$twin_dir/venv"
snapshot="$twin_dir/FLUX.1-schnell-twin"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, diffusers" 2>/dev/null; then
    echo "setting up $venv (torch, diffusers, transformers)..."
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch diffusers transformers safetensors tokenizers \
        sentencepiece protobuf accelerate pillow numpy
fi
if [ ! -f "$snapshot/model_index.json" ]; then
    echo "writing the test snapshot into $snapshot..."
    rm -rf "$snapshot.partial"
    "$venv/bin/python" "$repository/bench/diffusers_twin.py" snapshot "$snapshot.partial" 2>/dev/null
    mv "$snapshot.partial" "$snapshot"
fi
(cd "$repository" && cargo build --release --quiet)
target="${CARGO_TARGET_DIR:-$repository/target}"

# shellcheck disable=SC2086 # the sizes are a list
"$venv/bin/python" "$repository/bench/diffusers_twin.py" measure \
    --flowline "$target/release/flowline" --repository "$repository" \
    --snapshot "$snapshot" --work "$twin_dir/runs" --sizes $sizes --repeats "$repeats" \
    2> >(grep -v -e torchvision -e "kept in float32" >&2)
