"""Reproduce the toy world's shipped base model (sdtune/toy/assets/base) from random initialisation.

    python tools/pretrain_toy_base.py vae    --work /tmp/toy     # the autoencoder alone
    python tools/pretrain_toy_base.py unet   --work /tmp/toy     # UNet + text encoder, through train_dreambooth
    python tools/pretrain_toy_base.py ship   --work /tmp/toy     # copy the result into the package

Each stage prints its wall time; the measured times on a 2-core CPU are in sdtune/toy/README.md.
The unet stage resumes from its last checkpoint when re-run (it writes one every 500 steps).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from diffusers import AutoencoderKL

from sdtune.toy.base_model import BASE_DIR, build_random_base, pretrain, render_pretraining_data, train_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "unet", "ship"])
    parser.add_argument("--work", type=Path, default=Path("toy-pretrain"), help="Working folder.")
    parser.add_argument("--vae_steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=4000, help="UNet/text-encoder optimizer steps.")
    parser.add_argument("--num_images", type=int, default=20000, help="Rendered pretraining images.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    if args.stage == "vae":
        train_vae(steps=args.vae_steps, seed=args.seed).save_pretrained(args.work / "vae")
    elif args.stage == "unet":
        if not (args.work / "random-base" / "model_index.json").is_file():
            build_random_base(args.work / "random-base", AutoencoderKL.from_pretrained(args.work / "vae"), seed=args.seed)
        data = args.work / "data"
        if not data.is_dir():
            render_pretraining_data(data, args.num_images, seed=args.seed)
        pretrain(args.work / "random-base", data, args.work / "pretrained", max_train_steps=args.steps, seed=args.seed,
                 resume_from_checkpoint="latest")
    else:
        shutil.rmtree(BASE_DIR, ignore_errors=True)
        shutil.copytree(args.work / "pretrained", BASE_DIR,
                        ignore=shutil.ignore_patterns("checkpoint-*", "logs", "validation", "README.md", "*.yaml"))
    print(f"{args.stage}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
