"""Reproduce the toy world's judge (sdtune/toy/assets/judge.safetensors) and report its accuracy.

    python tools/train_toy_judge.py            # trains, prints per-attribute accuracy on fresh renders, saves
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from sdtune.toy.judge import JUDGE_FILE, judge_accuracy, save_judge, train_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(JUDGE_FILE))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    judge = train_judge(steps=args.steps, seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    print("accuracy on 3000 fresh renders:", json.dumps(judge_accuracy(judge)))
    print("saved", save_judge(judge, args.output))


if __name__ == "__main__":
    main()
