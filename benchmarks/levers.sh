#!/bin/bash
# Steady-state steps/s and peak RSS of `sdtune train-lora` on the SD 1.5 architecture (random weights), 256 px,
# rank 4, batch 1, 16 steps, once per speed lever, in one invocation. MODEL and DATA come from vs_diffusers.py
# (`python benchmarks/vs_diffusers.py --work W --build_model_only` style work folder: W/sd15-random, W/data-images).
#   MODEL=/tmp/vsd-work/sd15-random DATA=/tmp/vsd-work/data-images bash benchmarks/levers.sh
# METHOD=dreambooth and STEPS=N change what is timed.
# LEVERS picks a subset, one lever per line, e.g. LEVERS=$'--reuse_host_memory false\n' (an empty line: the default).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-/tmp/vsd-work/sd15-random}"
DATA="${DATA:-/tmp/vsd-work/data-images}"
LEVERS="${LEVERS:-$'--reuse_host_memory false\n\n--fused_optimizer false\n--channels_last\n--dataloader_num_workers 2\n--mixed_precision bf16\n--compile'}"
STEPS="${STEPS:-16}"
# METHOD=dreambooth times the full fine-tune (its update of 860 M parameters is where the optimizer matters)
case "${METHOD:-lora}" in
  lora) METHOD_ARGS="train-lora --rank 4 --learning_rate 1e-4" ;;
  dreambooth) METHOD_ARGS="train-dreambooth --learning_rate 5e-6" ;;
  *) echo "METHOD is lora or dreambooth" >&2; exit 2 ;;
esac
OUT="$(mktemp -d)"
while IFS= read -r lever; do
  start=$(date +%s)
  # shellcheck disable=SC2086  # a lever is an option and maybe its value
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONPATH="$PWD" /usr/bin/time -f "peak_rss_kib=%M" -o "$OUT/time" \
    python -m sdtune $METHOD_ARGS \
    --pretrained_model_name_or_path "$MODEL" --instance_data_dir "$DATA" --instance_prompt "a sks shape" \
    --output_dir "$OUT/run" --resolution 256 --train_batch_size 1 --max_train_steps "$STEPS" --seed 0 --mixed_precision no \
    --checkpointing_steps 0 --report_to none $lever > "$OUT/log" 2>&1
  echo "lever=[$lever] wall=$(( $(date +%s) - start ))s $(cat "$OUT/time") $(grep "^done" "$OUT/log")"
done <<< "$LEVERS"
