"""Which training results are bit-identical across machines, and what changes them: thread count, CPU kernels.

Trains the demo's DreamBooth-LoRA recipe (concept A, prior preservation, text-encoder LoRA) for a few
steps on the toy base under several settings and compares the LoRA files bit for bit with the first:

  - torch's intra-op threads (1 and 2): a reduction split over threads adds in another order;
  - ATEN_CPU_CAPABILITY (default = no SIMD, avx2, avx512 where the CPU has it): the kernels torch
    dispatches to; oneDNN/MKL matrix products pick their own code path by CPU as well (not settable here).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/determinism.py --work /tmp/det --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run(work: Path, name: str, steps: int, env: dict, data: Path) -> Path:
    out = work / name
    if not (out / "pytorch_lora_weights.safetensors").is_file():
        from sdtune.toy.base_model import BASE_DIR

        subprocess.run([sys.executable, "-m", "sdtune", "train-dreambooth", "--pretrained_model_name_or_path", str(BASE_DIR),
                        "--instance_data_dir", str(data / "concept_a"), "--instance_prompt", "a xon triangle",
                        "--with_prior_preservation", "--class_data_dir", str(data / "class_triangle"),
                        "--class_prompt", "a triangle", "--num_class_images", "60", "--use_lora", "--rank", "8",
                        "--lora_targets", "attn_ff", "--train_text_encoder", "--learning_rate", "3e-3",
                        "--text_encoder_lr", "5e-4", "--resolution", "32", "--train_batch_size", "4",
                        "--max_train_steps", str(steps), "--checkpointing_steps", "0", "--report_to", "none",
                        "--mixed_precision", "no", "--output_dir", str(out), "--overwrite_output_dir"],
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "pytorch_lora_weights.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", help="a learning_parity.py work folder's data/ (concept_a, class_triangle)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    capabilities = ["default", "avx2"] + (["avx512"] if "avx512f" in Path("/proc/cpuinfo").read_text() else [])
    settings = {"1 thread, avx2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"},
                "2 threads, avx2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2"}}
    settings |= {f"1 thread, {c}": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": c} for c in capabilities}
    files = {name: run(work, name.replace(" ", "").replace(",", "_"), args.steps, env, Path(args.data))
             for name, env in settings.items()}
    reference_name = "1 thread, avx2"
    reference = load_file(str(files[reference_name]))
    results = {}
    for name, path in files.items():
        weights = load_file(str(path))
        diff = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        scale = max(reference[k].abs().max().item() for k in reference)
        results[name] = {"bit_identical": all(torch.equal(weights[k], reference[k]) for k in reference),
                         "max_abs_diff": diff, "relative": diff / scale}
        print(f"{name:18} vs {reference_name}: bit-identical {results[name]['bit_identical']}, "
              f"max |diff| {diff:.2e} ({diff / scale:.1e} of the largest weight)")
    (work / "determinism.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
