#!/bin/bash
# Caching time and peak RSS of `sdtune train-lora` as the dataset grows: 8, 32 and 128 images at 256 px on the
# SD 1.5 architecture (random weights), 4 steps each, in one invocation. Each size gets its own work folder
# holding a link to the model that vs_diffusers.py built (MODEL) and its own rendered images.
#   MODEL=/tmp/vsd-work/sd15-random bash benchmarks/dataset_scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-/tmp/vsd-work/sd15-random}"
SIZES="${SIZES:-8 32 128}"
BASE="$(mktemp -d)"
for n in $SIZES; do
  mkdir -p "$BASE/n$n"
  ln -sfn "$MODEL" "$BASE/n$n/sd15-random"
  PYTHONPATH="$PWD" python benchmarks/vs_diffusers.py --tools sdtune --methods lora --lora_steps 4 \
    --images "$n" --work "$BASE/n$n" | grep "^lora sdtune" | sed "s/^/images=$n: /"
done
