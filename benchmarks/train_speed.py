"""Speed and memory of sdtune's trainers with caching on, against the same loop re-encoding every step.

Each configuration runs as its own `python -m sdtune train-...` process, so the whole-process
time includes imports, model loading and cache building. For every model both modes run in
the same invocation, on the same data and seed:

    python benchmarks/train_speed.py                                   # LoRA, tiny and small models, 64 px
    python benchmarks/train_speed.py --method dreambooth --models small  # full fine-tune with prior preservation

Prints a Markdown table (paste it into benchmarks/README.md). Columns:
  - steps/s: steady-state optimizer steps per second (first step excluded)
  - process s: wall time of the whole process
  - peak RSS MiB: the process's maximum resident memory
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdtune.toy import build_tiny_model, render_shape_dataset

MODELS = {
    # name: build_tiny_model keyword arguments
    "tiny": dict(),
    "small": dict(unet_channels=(64, 128, 256), vae_channels=(32, 64, 128, 128), hidden_size=256, text_layers=4),
}
MODES = {
    "cached (default)": [],
    "uncached baseline": ["--cache_latents", "false", "--cache_text_embeddings", "false"],
}


METHODS = {
    "lora": ["train-lora"],
    # class images are drawn up front (not generated) so both modes time training alone
    "dreambooth": ["train-dreambooth", "--with_prior_preservation", "--class_prompt", "a shape", "--num_class_images", "32",
                   "--instance_prompt", "a sks shape", "--learning_rate", "1e-5"],
}


def run_once(model: Path, data: Path, out: Path, steps: int, batch_size: int, method: list[str], extra: list[str]) -> dict:
    """One `python -m sdtune <method...> <extra...>` process: steady steps/s, wall time, peak RSS."""
    cmd = [sys.executable, "-m", "sdtune", *method, "--pretrained_model_name_or_path", str(model),
           "--instance_data_dir", str(data), "--output_dir", str(out), "--resolution", "64",
           "--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--checkpointing_steps", "0",
           "--report_to", "none", "--random_flip", "--seed", "0", *extra]
    start = time.perf_counter()
    # wait4 gives this one child's peak RSS (RUSAGE_CHILDREN would report the largest child so far)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    match = re.search(r"([\d.]+) steps/s", stdout)
    return {"steps_per_s": float(match.group(1)), "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=list(METHODS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sdtune-bench-"))
    data = render_shape_dataset(work / "data", num_images=args.images)
    method = list(METHODS[args.method])
    if args.method == "dreambooth":
        classes = render_shape_dataset(work / "class", num_images=32, shape="circle", color="green", caption="a shape")
        method += ["--class_data_dir", str(classes)]
    print(f"{args.method}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"python {platform.python_version()}; {args.steps} steps, batch {args.batch_size}, {args.images} images, 64 px\n")
    print("| model | UNet params | mode | steps/s | speed-up | process s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = build_tiny_model(work / name, **MODELS[name])
        import torch  # noqa: F401  (only to count parameters)
        from diffusers import UNet2DConditionModel

        params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())
        results = {mode: run_once(model, data, work / f"out-{name}-{i}", args.steps, args.batch_size, method, extra)
                   for i, (mode, extra) in enumerate(MODES.items())}
        baseline = results["uncached baseline"]["steps_per_s"]
        for mode, r in results.items():
            print(f"| {name} | {params / 1e6:.2f} M | {mode} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / baseline:.2f}x "
                  f"| {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
