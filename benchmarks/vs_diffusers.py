"""sdtune against diffusers' example scripts on the full Stable Diffusion 1.5 architecture, on this machine.

One invocation builds SD 1.5 (UNet 860 M, VAE, CLIP ViT-L text encoder) with random weights into a
work folder (seeded, never committed), renders one small image folder, and times each tool as its
own process: sdtune's `train-lora` against `train_dreambooth_lora.py`, and optionally sdtune's
`train-dreambooth` against `train_dreambooth.py`, with matching flags (rank 4, batch 1, 256 px,
seed 0, fp32 (or both bf16 with --mixed_precision bf16), no checkpoints, no validation, no tracker).

diffusers' scripts need torchvision, which does not import beside sdtune's torch, so they run in a
separate "reference" venv with a torch/torchvision pair that imports together and the same
diffusers/transformers/accelerate/peft versions. Make it (not committed) and get the scripts:

    python -m venv /work/ref-venv
    /work/ref-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers==0.42.1 \\
        transformers==5.23.0 accelerate==1.15.0 peft==0.21.2 Jinja2 ftfy
    # diffusers' examples/dreambooth/train_dreambooth_lora.py and train_dreambooth.py, from the
    # huggingface/diffusers repository, saved outside this repository, e.g. to /tmp

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/vs_diffusers.py \\
        --ref_python /work/ref-venv/bin/python \\
        --lora_script /tmp/train_dreambooth_lora.py --dreambooth_script /tmp/train_dreambooth.py

tensorboard is left out of the reference venv on purpose: the scripts' default `--report_to
tensorboard` then sets up no tracker, as sdtune's `--report_to none`.

What is measured, for every (tool, steps) run:
  - process s: wall time of the whole process, from spawn to exit;
  - steady steps/s: (t(step N) - t(step 1)) / (N - 1), from the time each progress-bar update
    reaches this script (the first, warm-up step excluded; the same rule for both tools);
  - peak RSS: the largest sum of the resident memory of the process and all its descendants,
    polled from /proc every 0.1 s (plus the kernel's own peak for the process, from wait4);
  - a start-up breakdown, from when marker lines reach this script (see PHASES).
Across step counts, (T_long - T_short) / (long - short) gives a second steady-state figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "a sks shape"
SEED = 0
THREADS = "2"

# Marker lines, in the order they appear: the phase named on a line ends when its marker arrives.
# sdtune prints no line when its imports end, so its process is started through a two-line
# bootstrap (SDTUNE_BOOTSTRAP) that imports `sdtune.api` (torch, diffusers, transformers, peft,
# accelerate and sdtune's trainer), prints a marker, and then runs the CLI's `main()` unchanged.
PHASES = {
    "sdtune": [
        ("imports", r"\[bench\] imports done"),
        ("model load", r"Caching latents"),  # setup() loads the model, adds the LoRA, then caches latents
        ("caching + optimizer setup", r"training \d+ samples for \d+ steps"),  # latents, text embeddings, optimizer
    ],
    "diffusers": [
        ("imports", r"Distributed environment"),  # logged right after the Accelerator is made
        ("model load + data/optimizer setup", r"\*\*\*\*\* Running training \*\*\*\*\*"),
    ],
}
STEP_BAR = re.compile(r"(?:Training|Steps):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) ")
SDTUNE_BOOTSTRAP = ("import sys, sdtune.api; print('[bench] imports done', flush=True)\n"
                    "from sdtune.cli import main; sys.exit(main())")


@dataclass
class Run:
    """One measured process."""

    tool: str
    method: str
    steps: int
    wall_s: float
    peak_tree_rss_mib: float
    peak_rss_wait4_mib: float
    steady_steps_per_s: float | None
    reported_steps_per_s: float | None  # the tool's own steady-state figure, where it prints one
    phases: dict[str, float] = field(default_factory=dict)
    log: str = ""


# ---------------------------------------------------------------- model and data
def build_sd15(folder: Path, smoke: bool) -> None:
    """Save SD 1.5's architecture (or, with ``smoke``, a tiny one) with seeded random weights.

    The configs are SD 1.5's: UNet (320, 640, 1280, 1280) x 2 layers with 768-wide cross-attention,
    the KL VAE (128, 256, 512, 512), CLIP ViT-L/14's text encoder (12 layers, 768 wide, vocabulary
    49,408) and the PNDM scheduler. The tokenizer is the CLIP BPE subset sdtune ships, whose ids
    fit the 49,408 vocabulary.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.toy.tiny_model import tiny_tokenizer

    torch.manual_seed(SEED)
    width, text_layers = (64, 2) if smoke else (768, 12)
    unet = UNet2DConditionModel(
        sample_size=8 if smoke else 64, in_channels=4, out_channels=4, layers_per_block=1 if smoke else 2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64) if smoke else (320, 640, 1280, 1280),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if smoke else 2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32) if smoke else (128, 256, 512, 512),
        norm_num_groups=32, sample_size=64 if smoke else 512, act_fn="silu", scaling_factor=0.18215,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=12 if not smoke else 4,
        num_hidden_layers=text_layers, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    (folder / "bench_params.json").write_text(json.dumps(counts))


def ensure_model(work: Path, smoke: bool) -> tuple[Path, dict]:
    """Build the model in a child process (the 860 M-parameter UNet stays out of this process), once per work folder."""
    folder = work / ("sd15-tiny-smoke" if smoke else "sd15-random")
    if not (folder / "bench_params.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build_model_only", str(folder), *(["--smoke"] if smoke else [])],
                       check=True, env=child_env("sdtune"))
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder, json.loads((folder / "bench_params.json").read_text())


def render_data(work: Path, num_images: int, resolution: int) -> tuple[Path, Path]:
    """The same images for both tools: sdtune's folder has `.txt` captions, diffusers' holds the images alone.

    (DreamBoothDataset opens every file in --instance_data_dir as an image; its caption is --instance_prompt,
    which is also every caption file's text.)
    """
    from sdtune.toy import render_shape_dataset

    with_captions = render_shape_dataset(work / "data-captioned", num_images, caption=PROMPT, size=resolution, seed=SEED)
    images_only = work / "data-images"
    images_only.mkdir(exist_ok=True)
    for image in sorted(with_captions.glob("*.png")):
        shutil.copy2(image, images_only / image.name)
    return with_captions, images_only


def warm_page_cache(folder: Path) -> None:
    """Read every model file once, so that neither tool's first run pays for the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


# ---------------------------------------------------------------- commands
def child_env(tool: str) -> dict:
    """Offline, unbuffered, 2 threads for both tools; sdtune from this checkout, diffusers' run without it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS,
           "MKL_NUM_THREADS": THREADS}
    repo = str(Path(__file__).resolve().parents[1])
    if tool == "sdtune":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    else:
        env.pop("PYTHONPATH", None)
    return env


def sdtune_command(method: str, model: Path, data: Path, out: Path, steps: int, resolution: int,
                   precision: str) -> list[str]:
    """`sdtune train-lora` / `train-dreambooth` (full fine-tune) with the flags that match diffusers' scripts."""
    specific = {"lora": ["train-lora", "--rank", "4", "--learning_rate", "1e-4"],
                "dreambooth": ["train-dreambooth", "--learning_rate", "5e-6"]}[method]
    return [sys.executable, "-c", SDTUNE_BOOTSTRAP, *specific, "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(out),
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--seed", str(SEED), "--mixed_precision", precision, "--checkpointing_steps", "0", "--report_to", "none"]


def diffusers_command(ref_python: str, script: str, method: str, model: Path, data: Path, out: Path, steps: int,
                      resolution: int, precision: str) -> list[str]:
    """diffusers' example script, run as `python script.py` (one process, as `accelerate launch` on one CPU)."""
    specific = {"lora": ["--rank", "4", "--learning_rate", "1e-4"], "dreambooth": ["--learning_rate", "5e-6"]}[method]
    return [ref_python, script, *specific, "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--output_dir", str(out),
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--seed", str(SEED), "--mixed_precision", precision, "--checkpointing_steps", "1000000",
            "--report_to", "tensorboard"]  # tensorboard is not installed there: no tracker is set up


# ---------------------------------------------------------------- measuring
def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, from /proc."""
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def poll_peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Keep the largest tree RSS in ``peak[0]`` until ``stop`` is set."""
    while not stop.is_set():
        peak[0] = max(peak[0], tree_rss_bytes(pid))
        stop.wait(0.1)


def run_timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, int, int, list[tuple[float, str]], int]:
    """Run ``cmd``; return wall s, peak tree RSS, wait4 peak RSS (bytes), timestamped output fragments, exit code.

    stdout and stderr are read through one pipe, split at newlines and carriage returns (tqdm's
    redraws), and each fragment is stamped with the time it arrived, relative to the spawn.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    stop, peak = threading.Event(), [0]
    poller = threading.Thread(target=poll_peak_rss, args=(proc.pid, stop, peak), daemon=True)
    poller.start()
    events, pending, pending_since = [], b"", 0.0
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        now = time.perf_counter() - start
        first, *rest = re.split(rb"[\r\n]", chunk)
        if not pending:
            pending_since = now
        pending += first
        if rest:  # a fragment is stamped with the arrival of its first byte (tqdm writes "\r" + bar)
            *complete, tail = rest
            stamped = [(pending_since, pending)] + [(now, fragment) for fragment in complete]
            events += [(t, fragment.decode(errors="replace")) for t, fragment in stamped if fragment.strip()]
            pending, pending_since = tail, now
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    if pending.strip():
        events.append((pending_since, pending.decode(errors="replace")))
    return wall, peak[0], usage.ru_maxrss * 1024, events, os.waitstatus_to_exitcode(status)


def first_time(events: list[tuple[float, str]], pattern: str) -> float | None:
    """When the first fragment matching ``pattern`` arrived."""
    regex = re.compile(pattern)
    return next((t for t, text in events if regex.search(text)), None)


def step_times(events: list[tuple[float, str]]) -> dict[int, float]:
    """Arrival time of each progress-bar step count (first occurrence)."""
    times: dict[int, float] = {}
    for t, text in events:
        for match in STEP_BAR.finditer(text):
            times.setdefault(int(match.group(1)), t)
    return times


def breakdown(tool: str, events: list[tuple[float, str]], steps: int, wall: float) -> dict[str, float]:
    """Seconds spent in each phase: the marker phases, the first step, steps 2..N, and what follows the last step."""
    phases, previous = {}, 0.0
    for name, pattern in PHASES[tool]:
        t = first_time(events, pattern)
        if t is None:
            return phases  # a marker is missing: report what was found
        phases[name], previous = t - previous, t
    times = step_times(events)
    if 1 in times and steps in times:
        phases["first step"] = times[1] - previous
        phases[f"steps 2..{steps}"] = times[steps] - times[1]
        phases["after the last step"] = wall - times[steps]
    return phases


def measure(tool: str, method: str, cmd: list[str], steps: int, out: Path, logs: Path) -> Run:
    """One run of ``cmd``; the log is kept in ``logs``, the output folder removed."""
    out.mkdir(parents=True, exist_ok=True)
    wall, tree_peak, wait4_peak, events, code = run_timed(cmd, child_env(tool), out)
    log = logs / f"{method}-{tool}-{steps}.log"
    log.write_text("".join(f"{t:9.2f} {text}\n" for t, text in events))
    shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"{tool} {method} {steps} steps exited {code}; see {log}")
    times = step_times(events)
    span = times[steps] - times[1] if 1 in times and steps in times else 0.0
    steady = (steps - 1) / span if steps > 1 and span > 0 else None
    reported = re.search(r"([\d.]+) steps/s \(steady state\)", "\n".join(text for _, text in events))
    return Run(tool, method, steps, wall, tree_peak / 2**20, wait4_peak / 2**20, steady,
               float(reported.group(1)) if reported else None, breakdown(tool, events, steps, wall), str(log))


def import_only_seconds(cmd: list[str], tool: str, cwd: Path) -> float:
    """Wall time of a process that only imports what the tool's training run imports first."""
    start = time.perf_counter()
    subprocess.run(cmd, env=child_env(tool), cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


# ---------------------------------------------------------------- report
def versions(python: str, tool: str) -> str:
    """torch / torchvision / diffusers / transformers / accelerate / peft versions of one venv."""
    code = ("import importlib.metadata as m, torch\n"
            "names = ['torch', 'torchvision', 'diffusers', 'transformers', 'accelerate', 'peft']\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return '-'\n"
            "print(', '.join(f'{n} {v(n)}' for n in names) + f'; torch threads {torch.get_num_threads()}, '"
            " + f'CPU capability {torch.backends.cpu.get_cpu_capability()}')")
    return subprocess.run([python, "-c", code], env=child_env(tool), capture_output=True, text=True,
                          check=True).stdout.strip()


def print_tables(runs: list[Run]) -> None:
    """Markdown: one summary table per method, then the start-up breakdown of every run."""
    for method in dict.fromkeys(r.method for r in runs):
        rows = [r for r in runs if r.method == method]
        print(f"\n**{method}**\n")
        print("| tool | steps | process s | steady steps/s (steps 2..N) | tool's own steps/s | peak RSS MiB (tree) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            steady = f"{r.steady_steps_per_s:.3f}" if r.steady_steps_per_s else "-"
            own = f"{r.reported_steps_per_s:.2f}" if r.reported_steps_per_s else "-"
            print(f"| {r.tool} | {r.steps} | {r.wall_s:.1f} | {steady} | {own} | {r.peak_tree_rss_mib:.0f} |")
        for tool in dict.fromkeys(r.tool for r in rows):
            mine = sorted((r for r in rows if r.tool == tool), key=lambda r: r.steps)
            if len(mine) >= 2 and mine[-1].steps > mine[0].steps:
                lo, hi = mine[0], mine[-1]
                rate = (hi.steps - lo.steps) / (hi.wall_s - lo.wall_s)
                print(f"\n{tool}: (T{hi.steps} - T{lo.steps}) / {hi.steps - lo.steps} steps = "
                      f"{1 / rate:.2f} s/step = {rate:.3f} steps/s")
    print("\n**start-up breakdown** (seconds, from when marker lines arrived)\n")
    for r in runs:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r.phases.items())
        print(f"- {r.method} {r.tool} {r.steps} steps: {parts}; total {r.wall_s:.1f}")


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref_python", help="python of the reference venv (diffusers' scripts run there)")
    parser.add_argument("--lora_script", help="path of diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--dreambooth_script", help="path of diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--methods", nargs="+", default=["lora"], choices=["lora", "dreambooth"])
    parser.add_argument("--tools", nargs="+", default=["sdtune", "diffusers"], choices=["sdtune", "diffusers"])
    parser.add_argument("--lora_steps", nargs="+", type=int, default=[8, 100])
    parser.add_argument("--dreambooth_steps", nargs="+", type=int, default=[4, 12])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"],
                        help="both tools' --mixed_precision (bf16: frozen weights in bf16, autocast; for AMX CPUs)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--work", help="work folder (default: a new temporary one); the model is reused if there")
    parser.add_argument("--json", help="write every run's numbers here as well (after each run)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model at 64 px: checks the harness in a minute")
    parser.add_argument("--build_model_only", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.build_model_only:
        build_sd15(Path(args.build_model_only), args.smoke)
        return
    if "diffusers" in args.tools and not args.ref_python:
        raise SystemExit("--ref_python is needed to run diffusers' scripts (see --help)")
    resolution = 64 if args.smoke else args.resolution
    work = Path(args.work or tempfile.mkdtemp(prefix="sdtune-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    model, params = ensure_model(work, args.smoke)
    captioned, images_only = render_data(work, args.images, resolution)
    warm_page_cache(model)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; python {platform.python_version()}")
    print(f"model: {model} (UNet {params['unet'] / 1e6:.1f} M, VAE {params['vae'] / 1e6:.1f} M, "
          f"text encoder {params['text_encoder'] / 1e6:.1f} M parameters); {args.images} images at {resolution} px")
    print(f"sdtune venv: {versions(sys.executable, 'sdtune')}")
    if "diffusers" in args.tools:
        print(f"reference venv: {versions(args.ref_python, 'diffusers')}")
    if "sdtune" in args.tools:
        print(f"import-only process, sdtune (`python -c 'import sdtune.api'`): "
              f"{import_only_seconds([sys.executable, '-c', 'import sdtune.api'], 'sdtune', work):.1f} s")
    if "diffusers" in args.tools and args.lora_script:
        print(f"import-only process, diffusers (`train_dreambooth_lora.py --help`): "
              f"{import_only_seconds([args.ref_python, args.lora_script, '--help'], 'diffusers', work):.1f} s")
    print(flush=True)

    runs: list[Run] = []
    for method in args.methods:
        script = args.lora_script if method == "lora" else args.dreambooth_script
        label = method if args.mixed_precision == "no" else f"{method}-{args.mixed_precision}"
        for steps in (args.lora_steps if method == "lora" else args.dreambooth_steps):
            for tool in args.tools:
                out = work / f"out-{label}-{tool}-{steps}"
                if tool == "sdtune":
                    cmd = sdtune_command(method, model, captioned, out, steps, resolution, args.mixed_precision)
                else:
                    if not script:
                        raise SystemExit(f"--{method}_script is needed for diffusers' {method} run")
                    cmd = diffusers_command(args.ref_python, script, method, model, images_only, out, steps, resolution,
                                            args.mixed_precision)
                try:
                    run = measure(tool, label, cmd, steps, out, logs)
                except RuntimeError as err:  # e.g. out of memory: report it, go on with the other runs
                    print(f"FAILED: {err}", flush=True)
                    continue
                runs.append(run)
                print(f"{label} {tool} {steps} steps: {run.wall_s:.1f} s, steady "
                      f"{run.steady_steps_per_s or 0:.3f} steps/s, peak RSS {run.peak_tree_rss_mib:.0f} MiB "
                      f"(wait4 {run.peak_rss_wait4_mib:.0f}); {run.phases}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    print_tables(runs)


if __name__ == "__main__":
    main()
