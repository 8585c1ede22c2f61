"""Training speed by CPU thread count and OpenMP wait policy, on a quiet machine and beside one CPU-bound process.

Each configuration is one `python -m sdtune train-lora` process (the demo's DreamBooth-LoRA recipe on the
toy base: 32 px, batch 4, rank 8) whose steady-state steps/s it prints; the competitor is one pure-Python
busy loop (a single core's worth of other work, as a second job on a shared machine). Every cell is the
median of --repeats runs, all taken in the same invocation:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/threads_under_load.py --work /tmp/threads [--sd15]

--sd15 adds the SD 1.5 architecture (random weights, see vs_diffusers.py) at 128 px, batch 1.

Configurations:
  all cores                  one thread per usable core (torch's default on an unshared machine)
  1 thread                   --num_threads 1
  all cores, PASSIVE         as all cores, with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep, not spin)
  sdtune default             sdtune's choice: usable cores (affinity, quota) / local processes, less the cores
                             other work keeps busy at the start (sdtune/threads.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_CORES = str(len(os.sched_getaffinity(0)))
CONFIGS = {
    "all cores (torch's default)": ({}, ["--num_threads", ALL_CORES]),
    "1 thread": ({}, ["--num_threads", "1"]),
    "all cores, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--num_threads", ALL_CORES]),
    "sdtune default (load-aware)": ({}, []),
}
LOADS = ("quiet", "beside 1 busy process")
SPEED = re.compile(r"([0-9.]+) steps/s")


def toy_job(work: Path) -> tuple[list[str], int]:
    """The demo's DreamBooth-LoRA recipe on the shipped toy base (its concept A images)."""
    from sdtune.toy.base_model import BASE_DIR
    from sdtune.toy.world import Scene, render_folder

    data = render_folder(work / "toy-data", [Scene("star", "yellow", b) for b in ("gray", "white")], 8, seed=0,
                         caption="a xon triangle")
    args = ["train-dreambooth", "--use_lora", "--pretrained_model_name_or_path", str(BASE_DIR), "--instance_data_dir",
            str(data), "--resolution", "32", "--train_batch_size", "4", "--rank", "8", "--learning_rate", "1e-3",
            "--train_text_encoder", "--mixed_precision", "no"]
    return args, 40


def sd15_job(work: Path) -> tuple[list[str], int]:
    """LoRA on the SD 1.5 architecture (random weights) at 128 px, batch 1."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_diffusers import build_sd15

    from sdtune.toy import render_shape_dataset

    model = work / "sd15-random"
    if not (model / "model_index.json").is_file():
        build_sd15(model, smoke=False)
    data = render_shape_dataset(work / "sd15-data", num_images=4, size=128)
    return ["train-lora", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--resolution", "128", "--train_batch_size", "1", "--rank", "4", "--mixed_precision", "no"], 6


def run(job: list[str], steps: int, out: Path, env: dict, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "sdtune", *job, "--output_dir", str(out), "--max_train_steps", str(steps),
           "--checkpointing_steps", "0", "--report_to", "none", "--overwrite_output_dir", *extra]
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    result = subprocess.run(cmd, capture_output=True, text=True, env={**clean, **env}, cwd=REPO)
    match = SPEED.search(result.stdout)
    if result.returncode or not match:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sd15", action="store_true")
    parser.add_argument("--sd15_repeats", type=int, default=None, help="Repeats of the SD 1.5 runs (default: --repeats).")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = {"toy base, LoRA, 32 px, batch 4": (*toy_job(args.work), args.repeats)}
    if args.sd15:
        jobs["SD 1.5 architecture, LoRA, 128 px, batch 1"] = (*sd15_job(args.work), args.sd15_repeats or args.repeats)
    rows = []
    for job_name, (job, steps, repeats) in jobs.items():
        for load in args.loads:
            competitor = None
            if load != "quiet":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            try:
                for name, (env, extra) in CONFIGS.items():
                    speeds = [run(job, steps, args.work / "out", env, extra) for _ in range(repeats)]
                    rows.append((job_name, load, name, statistics.median(speeds), speeds))
                    print(f"{job_name} | {load} | {name} | {statistics.median(speeds):.2f} steps/s {speeds}", flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}\n")
    print("| model | machine | configuration | steps/s (median) | runs |")
    print("| --- | --- | --- | --- | --- |")
    for job_name, load, name, median, speeds in rows:
        print(f"| {job_name} | {load} | {name} | {median:.2f} | {', '.join(f'{s:.2f}' for s in speeds)} |")


if __name__ == "__main__":
    main()
