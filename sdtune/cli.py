"""Command line: subcommand → config → run. No training logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import yaml

from sdtune.command_configs import CaptionConfig, DemoConfig, EvalConfig, GenerateConfig, PushConfig
from sdtune.config import ControlNetConfig, DreamBoothConfig, LoRAConfig, TextualInversionConfig, TrainConfig
from sdtune.diffusers_compat import apply_compat_flags, compat_flags, hide_hub_token
from sdtune.errors import ConfigError, SdtuneError
from sdtune.sweep import SweepConfig
from sdtune.options import build_config, did_you_mean, field_base_type, load_recipe, parse_value

logger = logging.getLogger("sdtune")


# Runners import lazily: torch and diffusers take seconds to import, and `--help` should not wait.
def _train(name: str) -> Callable:
    def run(config) -> None:
        from sdtune.preflight import check_before_imports

        check_before_imports(config)  # a wrong path or option fails now, not after seconds of imports
        from sdtune import api

        result = getattr(api, name)(config)
        if result.outputs:  # the main process
            speed = f", {result.steps_per_second:.2f} steps/s (steady state)" if result.steps_per_second else ""
            print(f"done: {result.global_step} steps, final loss {result.final_loss:.4f}{speed}")
            for kind, path in result.outputs.items():
                print(f"  {kind}: {path}")

    return run


def _generate(config: GenerateConfig) -> None:
    from sdtune.sampling import run_generate

    paths = run_generate(config)
    print(f"wrote {len(paths)} image(s) to {config.output_dir}")


def _eval(config: EvalConfig) -> None:
    from sdtune.evaluate import run_eval

    run_eval(config)
    print(f"wrote the metrics, samples and grid to {config.output_dir}")


def _sweep(config) -> None:
    from sdtune.sweep import run_sweep

    best = run_sweep(config)
    if best:
        print(f"best: trial {best['trial']}; its recipe: {best['recipe']}")


def _push(config: PushConfig) -> None:
    from sdtune.hub import push_to_hub

    if not config.folder or not config.repo_id:
        raise ConfigError("usage: sdtune push OUTPUT_DIR --repo_id me/my-model")
    print(push_to_hub(config.folder, config.repo_id, private=config.private, revision=config.revision,
                      commit_message=config.commit_message))


def _caption(config: CaptionConfig) -> None:
    from sdtune.captioning import caption_images

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch: split the images across processes
        from accelerate import Accelerator

        accelerator = Accelerator()
    summary = caption_images(config, accelerator)
    if accelerator is None or accelerator.is_main_process:
        print(f"captioned {summary.captioned}, skipped {summary.skipped} (already captioned), failed {summary.failed}")
    if accelerator is not None:
        accelerator.end_training()  # tear the process group down before the interpreter exits


def _demo(config: DemoConfig) -> None:
    kwargs = {"base": config.base_model} if config.base_model else {}
    if config.controlnet:
        from sdtune.toy.controlnet_demo import run_controlnet_demo

        run_controlnet_demo(config.output_dir, seed=config.seed, **kwargs)
        return
    from sdtune.toy.demo import run_demo

    run_demo(config.output_dir, quick=config.quick, seed=config.seed, **kwargs)


@dataclass(frozen=True)
class Command:
    config_cls: type
    run: Callable
    description: str
    positional: str | None = None  # a field also accepted as the first positional argument


COMMANDS: dict[str, Command] = {
    "train-lora": Command(LoRAConfig, _train("train_lora"), "Train a LoRA (diffusers + kohya exports); pivotal tuning."),
    "train-dreambooth": Command(DreamBoothConfig, _train("train_dreambooth"),
                                "DreamBooth: full fine-tune (pipeline folder, single file) or --use_lora; prior preservation."),
    "train-textual-inversion": Command(TextualInversionConfig, _train("train_textual_inversion"),
                                       "Textual inversion: learn a new token's embedding (diffusers + A1111 files)."),
    "train-controlnet": Command(ControlNetConfig, _train("train_controlnet"),
                                "ControlNet: steer the frozen base with control maps (diffusers folder + single file)."),
    "caption": Command(CaptionConfig, _caption, "Caption images with BLIP-2 / BLIP / InstructBLIP.", positional="data_dir"),
    "generate": Command(GenerateConfig, _generate, "Images from a base model plus a LoRA, embeddings or DreamBooth output."),
    "eval": Command(EvalConfig, _eval, "Measure a LoRA, embeddings, DreamBooth model or every checkpoint of a run: "
                                       "CLIP-T, CLIP-I, DINO, FID, KID, prior drift (and the toy world's judge figures)."),
    "sweep": Command(SweepConfig, _sweep, "Search any training options with Optuna, each trial scored by sdtune eval; "
                                         "writes results.csv, a plot and best_recipe.yaml. The sweep file (--config) holds recipe, space, eval, "
                                         "objectives and constraints: see examples/toy_sweep.yaml."),
    "push": Command(PushConfig, _push, "Upload an output folder to the Hugging Face Hub.", positional="folder"),
    "demo": Command(DemoConfig, _demo, "Offline quickstart: teach the toy world's held-out concepts with four methods and "
                                       "measure what each learned and kept (metrics.json, before/after grids)."),
}


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one ConfigError line (main prints it) instead of usage text and an exit."""

    def error(self, message: str):
        raise ConfigError(message)


COMPAT_PREFIX = "compat:"  # argparse dest of the diffusers-only flags (sdtune.diffusers_compat)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtune", description="Fine-tune Stable Diffusion.", allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.description, description=command.description, allow_abbrev=False,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--config", metavar="RECIPE.yaml", help="Recipe YAML; flags given here override its values.")
        sub.add_argument("--print-config", "--print_config", action="store_true",
                         help="Print the resolved config as YAML and exit.")
        sub.add_argument("--debug", action="store_true", help="Show full tracebacks.")
        _add_config_flags(sub, command)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    group = parser.add_argument_group(f"{command.config_cls.__name__} options (recipe keys use the same names)")
    for f in dataclasses.fields(command.config_cls):
        if f.metadata.get("yaml_only"):  # nested settings (a sweep's search space): only a --config file can hold them
            continue
        if f.name == command.positional:
            parser.add_argument(f"_{f.name}", nargs="?", metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=_literal(f.metadata["help"]))
        default = f.metadata.get("default_text", f.default if f.default is not dataclasses.MISSING else "required")
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        text = f.metadata["help"]
        if "(default" not in text:  # a help text that explains its default already says it once
            text += f" (default: {default!r})" if default == "" else f" (default: {default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=_literal(text))
        if field_base_type(f) is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif f.metadata.get("nargs"):  # a comma-separated list that diffusers' flag takes space-separated
            kwargs.update(nargs=f.metadata["nargs"], metavar=field_base_type(f).__name__.upper())
        else:
            kwargs.update(metavar=field_base_type(f).__name__.upper())
        group.add_argument(*flags, **kwargs)
    if issubclass(command.config_cls, TrainConfig):
        group = parser.add_argument_group("diffusers example-script flags (accepted so their command lines keep working)")
        for name, (nargs, text) in compat_flags().items():
            flags = [f"--{name}", f"--{name.replace('_', '-')}"]
            kwargs = dict(dest=COMPAT_PREFIX + name, default=argparse.SUPPRESS, help=_literal(text), nargs=nargs)
            if nargs == "?":
                kwargs.update(const="true", metavar="BOOL")
            group.add_argument(*flags, **kwargs)


def _literal(help_text: str) -> str:
    """argparse %-formats help strings; our texts are plain prose ("~15% faster"), so escape them."""
    return help_text.replace("%", "%%")


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _attach_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--learning_rate -1e-4`` as ``--learning_rate=-1e-4``: argparse takes -1e-4 for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_config(command: str, argv: Sequence[str]):
    """Resolve recipe + flags (+ positional) for a subcommand into its frozen config."""
    spec = COMMANDS[command]
    args, unknown = build_parser().parse_known_args([command, *_attach_negative_numbers(argv)])
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    if unknown:
        raise ConfigError(_unknown_message(unknown, [*fields, *compat_flags(), "config", "print_config", "debug"]))
    values = load_recipe(args.config) if args.config else {}
    given = vars(args)
    if spec.positional and f"_{spec.positional}" in given:
        values[spec.positional] = given[f"_{spec.positional}"]
    for name, text in given.items():
        if name in fields:
            values[name] = parse_value(fields[name], ",".join(text) if isinstance(text, list) else text)
    compat = {name[len(COMPAT_PREFIX):]: text for name, text in given.items() if name.startswith(COMPAT_PREFIX)}
    apply_compat_flags(compat, values, explicit={name for name in given if name in fields})
    return build_config(spec.config_cls, values, source=f"key in {args.config}" if args.config else "option"), args


def _unknown_message(unknown: Sequence[str], names: Sequence[str]) -> str:
    """Every unknown flag in one line, each with its did-you-mean."""
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not flags:
        return f"unexpected argument{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}"
    parts = []
    for flag in flags:
        hint = did_you_mean(flag.lstrip("-").replace("-", "_"), names, prefix="--").lstrip("; ")
        parts.append(f"'{flag}'" + (f" ({hint})" if hint else ""))
    return f"unknown option{'s' if len(flags) > 1 else ''} {', '.join(parts)}"


def main(argv: Sequence[str] | None = None) -> int:
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_sys_argv:
        hide_hub_token(sys.argv)  # the copy above keeps it; trackers that record sys.argv see ***
    debug = "--debug" in argv
    _setup_logging()
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"sdtune: error: unknown command '{command}'{did_you_mean(command, COMMANDS)}; see sdtune --help",
              file=sys.stderr)
        return 2
    try:
        config, args = parse_config(command, argv[1:])
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        COMMANDS[command].run(config)
        return 0
    except SdtuneError as err:
        if debug:
            raise
        print(f"sdtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted; resume training with --resume_from_checkpoint latest", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    # Under accelerate/torchrun every process would print the same lines: only rank 0 logs info.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers/diffusers print import-time notices (e.g. that torchvision is absent) that are
    # not the user's concern; set before they are imported. An explicit user setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Deprecation notices about arguments diffusers passes on (not the user's): nothing to act on.
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
