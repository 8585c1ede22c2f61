#!/bin/bash
# Steady-state steps/s of `sdtune train-lora` on the SD 1.5 architecture (random weights), 256 px, rank 4,
# batch 1, 16 steps, once per speed lever, in one invocation. MODEL and DATA come from vs_diffusers.py
# (`python benchmarks/vs_diffusers.py --work W --build_model_only` style work folder: W/sd15-random, W/data-images).
#   MODEL=/tmp/vsd-work/sd15-random DATA=/tmp/vsd-work/data-images bash benchmarks/levers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-/tmp/vsd-work/sd15-random}"
DATA="${DATA:-/tmp/vsd-work/data-images}"
OUT="$(mktemp -d)"
for lever in "" "--channels_last" "--fused_optimizer" "--compile"; do
  start=$(date +%s)
  out=$(HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONPATH="$PWD" python -m sdtune train-lora --rank 4 --learning_rate 1e-4 \
    --pretrained_model_name_or_path "$MODEL" --instance_data_dir "$DATA" --instance_prompt "a sks shape" \
    --output_dir "$OUT/run" --resolution 256 --train_batch_size 1 --max_train_steps 16 --seed 0 --mixed_precision no \
    --checkpointing_steps 0 --report_to none $lever 2>&1 | grep "^done")
  echo "lever=[$lever] wall=$(( $(date +%s) - start ))s $out"
done
