"""Command line: subcommand → config → run. No training logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Callable, Sequence

import yaml

from sdtune.config import DreamBoothConfig, LoRAConfig, TextualInversionConfig, TrainConfig, build_config, did_you_mean, field_base_type, load_recipe, parse_value
from sdtune.errors import ConfigError, SdtuneError

logger = logging.getLogger("sdtune")


def _runner(name: str) -> Callable:
    def run(config):
        from sdtune import api  # deferred: torch/diffusers take seconds to import, --help should not

        return getattr(api, name)(config)

    return run


# subcommand → (config class, runner, one-line description)
TRAINERS: dict[str, tuple[type[TrainConfig], Callable, str]] = {
    "train-lora": (LoRAConfig, _runner("train_lora"), "Train a LoRA (diffusers + kohya exports)."),
    "train-dreambooth": (DreamBoothConfig, _runner("train_dreambooth"),
                         "DreamBooth: full fine-tune (pipeline folder, single file) or --use_lora; prior preservation."),
    "train-textual-inversion": (TextualInversionConfig, _runner("train_textual_inversion"),
                                "Textual inversion: learn a new token's embedding (diffusers + A1111 files)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description="Fine-tune Stable Diffusion.", allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (config_cls, _, description) in TRAINERS.items():
        sub = subparsers.add_parser(name, help=description, description=description, allow_abbrev=False,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_common_flags(sub)
        _add_config_flags(sub, config_cls)
    demo = subparsers.add_parser("demo", help="Offline quickstart: train a LoRA on a tiny model the package builds.",
                                 allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--output_dir", "--output-dir", default="sdtune-demo", help="Where the demo writes everything.")
    demo.add_argument("--max_train_steps", "--max-train-steps", type=int, default=200, help="Training steps.")
    demo.add_argument("--seed", type=int, default=0, help="Seed.")
    demo.add_argument("--debug", action="store_true", help="Show tracebacks.")
    return parser


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="RECIPE.yaml", help="Recipe YAML; flags given here override its values.")
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="Print the resolved config as YAML and exit.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type[TrainConfig]) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} options (recipe keys use the same names)")
    for f in dataclasses.fields(config_cls):
        default = f.default
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
        if field_base_type(f) is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=field_base_type(f).__name__.upper())
        group.add_argument(*flags, **kwargs)


def parse_config(command: str, argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """Resolve recipe + flags for a training subcommand."""
    config_cls = TRAINERS[command][0]
    parser = build_parser()
    args, unknown = parser.parse_known_args([command, *argv])
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        names = [f.name for f in dataclasses.fields(config_cls)]
        raise ConfigError(f"unknown option '{flag}'{did_you_mean(flag.lstrip('-').replace('-', '_'), names)}")
    values = load_recipe(args.config) if args.config else {}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name, text in vars(args).items():
        if name in fields:
            values[name] = parse_value(fields[name], text)
    return build_config(config_cls, values, source=f"key in {args.config}" if args.config else "option"), args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _setup_logging()
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command = argv[0]
    if command not in TRAINERS and command != "demo":
        close = did_you_mean(command, [*TRAINERS, "demo"])
        print(f"sdtune: error: unknown command '{command}'{close}; see sdtune --help", file=sys.stderr)
        return 2
    try:
        if command == "demo":
            from sdtune.toy.demo import run_demo

            args = parser.parse_args(argv)
            run_demo(args.output_dir, max_train_steps=args.max_train_steps, seed=args.seed)
            return 0
        config, args = parse_config(command, argv[1:])
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        result = TRAINERS[command][1](config)
        if result.outputs:
            speed = f", {result.steps_per_second:.2f} steps/s (steady state)" if result.steps_per_second else ""
            print(f"done: {result.global_step} steps, final loss {result.final_loss:.4f}{speed}")
            for kind, path in result.outputs.items():
                print(f"  {kind}: {path}")
        return 0
    except SdtuneError as err:
        if debug:
            raise
        print(f"sdtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    # Under accelerate/torchrun every process would print the same lines: only rank 0 logs info.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers/diffusers print import-time notices (e.g. that torchvision is absent) that are
    # not the user's concern; set before they are imported. An explicit user setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
