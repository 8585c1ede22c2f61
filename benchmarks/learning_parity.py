"""What sdtune learns and keeps against diffusers' own example scripts, on the toy world, at one recipe.

For each method, both tools get the *same command line* (the flags are diffusers' names, which sdtune
accepts), the same data and the same seeds; each result is loaded through diffusers' own loaders and
scored by the demo's judge (96 fixed-seed samples per figure, the same sampling seeds for every model):

  dreambooth           train_dreambooth.py       full fine-tune, text encoder trained, prior preservation
  dreambooth_no_prior  train_dreambooth.py       the same without prior preservation
  lora                 train_dreambooth_lora.py  DreamBooth-LoRA (UNet attention + text-encoder LoRA), prior
  textual_inversion    textual_inversion.py      concept B, two vectors, the script's caption templates

Concept A (a star, taught as "xon triangle") and concept B (a green square, "<gsq>") are the demo's.
The figures: subject fidelity, context fidelity, prior preservation (class-prompt accuracy over the
base's) and prior drift (class prompts that draw the concept); each reported as mean and min-max over
the seeds, per tool.

diffusers' scripts need torchvision, so they run in a separate venv (see vs_diffusers.py for how to
make it); the scripts are fetched at benchmark time from the huggingface/diffusers repository
(examples/dreambooth/train_dreambooth.py, train_dreambooth_lora.py, examples/textual_inversion/
textual_inversion.py) into a folder outside this repository, never committed:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/learning_parity.py --work /tmp/lp \\
        --ref_python /work/ref-venv/bin/python --scripts_dir /tmp/diffusers-scripts \\
        --methods dreambooth dreambooth_no_prior lora textual_inversion --seeds 0 1 2 3 4 --jobs 2

Every process runs on one thread (--jobs processes side by side on as many cores). Finished runs are
kept in --work and not redone: a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"dreambooth": "train_dreambooth.py", "dreambooth_no_prior": "train_dreambooth.py",
           "lora": "train_dreambooth_lora.py", "textual_inversion": "textual_inversion.py"}
SDTUNE_COMMANDS = {"dreambooth": "train-dreambooth", "dreambooth_no_prior": "train-dreambooth",
                   "lora": "train-dreambooth", "textual_inversion": "train-textual-inversion"}
FIGURES = ("subject_fidelity", "context_fidelity", "prior_preservation", "prior_drift")

# The recipes: the demo's data and sizes (resolution 32, batch 4, fp32, constant lr), one learning rate
# for the UNet and the text encoder (diffusers' scripts have one), no checkpoints, no validation.
COMMON = ["--resolution", "32", "--train_batch_size", "4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
          "--mixed_precision", "no", "--checkpointing_steps", "100000"]
CONCEPT_A = ["--instance_prompt", "a xon triangle", "--train_text_encoder"]
PRIOR = ["--with_prior_preservation", "--class_prompt", "a triangle", "--num_class_images", "60", "--prior_loss_weight", "1.0"]
RECIPES = {
    "dreambooth": CONCEPT_A + PRIOR + ["--learning_rate", "2e-4", "--max_train_steps", "250"],
    "dreambooth_no_prior": CONCEPT_A + ["--learning_rate", "2e-4", "--max_train_steps", "250"],
    "lora": CONCEPT_A + PRIOR + ["--learning_rate", "1e-3", "--max_train_steps", "400", "--rank", "8"],
    # textual_inversion.py neither clips gradients nor scales the lr unless asked (--scale_lr is off)
    "textual_inversion": ["--placeholder_token", "<gsq>", "--initializer_token", "square", "--num_vectors", "2",
                          "--learnable_property", "object", "--learning_rate", "1e-2", "--max_train_steps", "400"],
}
# Flags only one tool has, to make the recipe the same where their defaults differ.
SDTUNE_ONLY = {
    "common": ["--report_to", "none"],
    "lora": ["--use_lora", "--lora_targets", "attn"],  # diffusers' LoRA script adapts to_q/k/v/out.0 only
    # textual_inversion.py: random flips (p 0.5), no gradient clipping, the object templates on every image
    "textual_inversion": ["--random_flip", "--max_grad_norm", "0"],
}


def prepare(work: Path) -> dict:
    """Render the demo's data (PNGs only: diffusers' scripts read every file of a folder as an image),
    generate the 60 class images once with the base, and score the base once."""
    done = work / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    import torch
    from accelerate import Accelerator

    from sdtune.data.class_images import ensure_class_images
    from sdtune.models import load_components
    from sdtune.toy.demo import Demo

    torch.set_num_threads(1)
    demo = Demo(work / "demo")
    folders = {}
    for concept in ("a", "b"):
        folder = work / "data" / f"concept_{concept}"
        folder.mkdir(parents=True, exist_ok=True)
        for png in sorted(demo.data[concept].glob("*.png")):
            shutil.copy2(png, folder / png.name)
        folders[concept] = str(folder)
    class_dir = work / "data" / "class_triangle"
    ensure_class_images(load_components(str(demo.base)), Accelerator(cpu=True), class_data_dir=str(class_dir),
                        class_prompt="a triangle", num_class_images=60, resolution=32, seed=0)
    base = {c: demo.base_report(c).as_dict() for c in ("a", "b")}
    prepared = {"base_model": str(demo.base), "instance": folders, "class_dir": str(class_dir), "base": base}
    done.write_text(json.dumps(prepared, indent=2))
    return prepared


def command(tool: str, method: str, seed: int, output_dir: Path, prepared: dict, args) -> list[str]:
    concept = "b" if method == "textual_inversion" else "a"
    flags = ["--pretrained_model_name_or_path", prepared["base_model"], "--instance_data_dir" if concept == "a" else
             "--train_data_dir", prepared["instance"][concept], "--output_dir", str(output_dir), "--seed", str(seed),
             *COMMON, *RECIPES[method]]
    if "--with_prior_preservation" in flags:
        flags += ["--class_data_dir", prepared["class_dir"]]
    if tool == "diffusers":
        return [args.ref_python, str(Path(args.scripts_dir) / SCRIPTS[method]), *flags]
    return [sys.executable, "-m", "sdtune", SDTUNE_COMMANDS[method], *flags, *SDTUNE_ONLY["common"],
            *SDTUNE_ONLY.get(method, [])]


def run_one(tool: str, method: str, seed: int, prepared: dict, args) -> dict | None:
    """Train (one process), then score the result (another); both on one thread. Reuses a finished run.

    A failed run is reported with the end of its log and left out of the table (None)."""
    run_dir = Path(args.work) / "runs" / method / tool / f"seed{seed}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    try:
        with open(run_dir / "train.log", "w") as log:
            subprocess.run(command(tool, method, seed, run_dir / "out", prepared, args), env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=True, cwd=run_dir)
        train_seconds = time.perf_counter() - start
        subprocess.run([sys.executable, __file__, "--score", str(run_dir / "out"), "--method", method,
                        "--work", args.work], env=env, check=True)
    except subprocess.CalledProcessError as err:
        tail = (run_dir / "train.log").read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-5:]
        print(f"{method} {tool} seed {seed} failed ({err}):\n  " + "\n  ".join(tail), flush=True)
        return None
    metrics = json.loads((run_dir / "out" / "judge.json").read_text())
    metrics.update(tool=tool, method=method, seed=seed, train_seconds=round(train_seconds, 1))
    metrics_file.write_text(json.dumps(metrics, indent=2))
    print(f"{method:20} {tool:9} seed {seed}: " + ", ".join(f"{k} {metrics[k]:.2f}" for k in FIGURES)
          + f" ({train_seconds:.0f} s)", flush=True)
    return metrics


def score(output: Path, method: str, work: Path) -> None:
    """Load the result through diffusers' loaders (as the demo does) and judge it against the base's figures."""
    import torch

    from sdtune.evaluation import ConceptReport
    from sdtune.toy.demo import CONCEPT_OF, Demo, _load_result

    torch.set_num_threads(1)
    prepared = json.loads((work / "prepared.json").read_text())
    demo = Demo(work / "demo")
    concept = CONCEPT_OF[method]
    name = {"dreambooth_no_prior": "dreambooth"}.get(method, method)
    report = demo.evaluate(_load_result(name, prepared["base_model"], output), concept)
    base = ConceptReport(**{k: v for k, v in prepared["base"][concept].items() if k != "prior_preservation"}
                         | {"seconds": 0.0})
    (output / "judge.json").write_text(json.dumps(report.as_dict(base=base), indent=2))


def summarize(results: list[dict]) -> str:
    """One row per (method, tool): each figure as mean (min-max) over the seeds; then the parity verdicts."""
    lines = ["| method | tool | seeds | " + " | ".join(f.replace("_", " ") for f in FIGURES) + " | train s |",
             "|---|---|---|" + "---|" * (len(FIGURES) + 1)]
    keys = sorted({(r["method"], r["tool"]) for r in results}, key=lambda k: (list(RECIPES).index(k[0]), k[1]))
    for method, tool in keys:
        rows = [r for r in results if (r["method"], r["tool"]) == (method, tool)]
        cells = []
        for figure in FIGURES:
            values = [r[figure] for r in rows]
            cells.append(f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        seconds = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"| {method} | {tool} | {len(rows)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n\n" + verdicts(results)


def verdicts(results: list[dict]) -> str:
    """Per method and figure: sdtune's mean minus diffusers' (drift: diffusers' minus sdtune's, lower is better),
    against the larger of the two seed spreads (max - min): at parity the difference is above minus the spread.
    Welch's p-value says how likely a difference this large is between two equal trainers, seed noise alone."""
    lines = ["| method | " + " | ".join(f.replace("_", " ") for f in FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
    for method in [m for m in RECIPES if {r["method"] for r in results} >= {m}]:
        by_tool = {tool: [r for r in results if r["method"] == method and r["tool"] == tool] for tool in ("sdtune", "diffusers")}
        if not all(by_tool.values()):
            continue
        cells = []
        for figure in FIGURES:
            values = {tool: [r[figure] for r in rows] for tool, rows in by_tool.items()}
            sign = -1 if figure == "prior_drift" else 1
            difference = sign * (statistics.mean(values["sdtune"]) - statistics.mean(values["diffusers"]))
            spread = max(max(v) - min(v) for v in values.values())
            p_value = _welch_p(values["sdtune"], values["diffusers"])
            cells.append(f"{difference:+.2f} vs -{spread:.2f}: {'parity' if difference >= -spread else 'BELOW'} (p {p_value:.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test that the two means are equal (nan when a side has no spread)."""
    from scipy.stats import ttest_ind

    if len(set(a)) < 2 and len(set(b)) < 2:
        return float("nan")
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="work folder; finished runs in it are reused")
    parser.add_argument("--ref_python", help="python of the reference venv (diffusers' scripts run there)")
    parser.add_argument("--scripts_dir", help="folder holding diffusers' train_dreambooth.py, train_dreambooth_lora.py "
                                              "and textual_inversion.py")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--tools", nargs="+", default=["sdtune", "diffusers"], choices=["sdtune", "diffusers"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (at most the cores)")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # internal: score one output folder
    parser.add_argument("--method", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    if args.score:
        score(Path(args.score), args.method, work)
        return
    if "diffusers" in args.tools and not (args.ref_python and args.scripts_dir):
        sys.exit("diffusers' runs need --ref_python and --scripts_dir (see this script's docstring)")
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(work)
    runs = [(tool, method, seed) for method in args.methods for seed in args.seeds for tool in args.tools]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = [r for r in pool.map(lambda run: run_one(*run, prepared, args), runs) if r is not None]
    table = summarize(results)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    (work / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
