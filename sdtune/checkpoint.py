"""Resumable checkpoints in safetensors + JSON, written atomically.

A checkpoint holds only what training changes: the method's trained tensors, the optimizer
state, the LR-scheduler and grad-scaler state, the step and the loss history. No RNG state is
needed: every random draw in sdtune is derived from (seed, step), so 2 steps + resume + 2
steps equals 4 steps exactly. Nothing here is pickled, so loading a checkpoint cannot run code.

Layout of ``output_dir/checkpoint-<step>/``:
    trained.safetensors    method.state_dict()
    optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
    trainer_state.json     step, losses, optimizer hyper-parameters, scheduler and scaler state, the run's identity
    + the method's loadable outputs at that step: LoRA files (``pipe.load_lora_weights(folder)``),
      ``unet/`` and ``text_encoder/`` (``from_pretrained``; the EMA weights with --use_ema), embeddings
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sdtune.errors import ConfigError, SdtuneError
from sdtune.run_identity import STATE_FILE, list_checkpoints

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    global_step: int = 0
    loss_history: list[float] = field(default_factory=list)


def save_checkpoint(
    output_dir: Path, state: TrainerState, trained: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler=None,
    total_limit: int | None = None, write_outputs: Callable[[Path], None] | None = None, run: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` through a temporary folder renamed at the end (main process only).

    ``write_outputs(folder)`` adds the method's loadable files (LoRA files, ``unet/``, embeddings)
    to the temporary folder, so a checkpoint holds them only when it is complete. ``run`` records
    which run wrote it (sdtune.run_identity).
    """
    final = output_dir / f"checkpoint-{state.global_step}"
    tmp = output_dir / f".checkpoint-{state.global_step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
    optimizer_tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    if write_outputs is not None:
        write_outputs(tmp)
    payload = {
        "global_step": state.global_step,
        "loss_history": state.loss_history,
        "optimizer": optimizer_json,
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "run": run,
    }
    (tmp / STATE_FILE).write_text(json.dumps(payload))  # written last: its presence marks a complete checkpoint
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: Path) -> Path | None:
    """'latest' → newest complete checkpoint in output_dir (None if there is none); else the given folder,
    looked up inside output_dir too (``checkpoint-500``, as diffusers does)."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file() and (output_dir / path / STATE_FILE).is_file():
        path = output_dir / path
    if not (path / STATE_FILE).is_file():
        raise SdtuneError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a complete sdtune checkpoint "
                          f"(no {STATE_FILE} there or in {output_dir})")
    return path


def load_checkpoint(path: Path, optimizer, lr_scheduler, scaler=None) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """Restore optimizer/scheduler/scaler in place; return the trainer state and the trained tensors."""
    payload = json.loads((path / STATE_FILE).read_text())
    optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer_state(optimizer_tensors, payload["optimizer"]))
    _restore_schedule(lr_scheduler, optimizer, payload["lr_scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    state = TrainerState(global_step=payload["global_step"], loss_history=payload["loss_history"])
    return state, load_file(str(path / "trained.safetensors"))


def saved_run(path: Path) -> dict | None:
    """The run identity a checkpoint recorded (None for checkpoints of older sdtune versions)."""
    return json.loads((path / STATE_FILE).read_text()).get("run")


def _restore_schedule(lr_scheduler, optimizer, saved: dict) -> None:
    """Continue the schedule at the saved step, under the current run's settings.

    The current --learning_rate and schedule length win over the checkpoint's, and the
    optimizer's lr is recomputed for the next step: a run trained to the end of a shorter
    schedule would otherwise resume at lr 0 (kohya #141).
    """
    base_lrs = list(lr_scheduler.base_lrs)
    lr_scheduler.load_state_dict(saved)
    lr_scheduler.base_lrs = base_lrs
    lrs = [base * schedule(lr_scheduler.last_epoch) for base, schedule in zip(base_lrs, lr_scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(saved["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def check_trained_shapes(path: Path, trained_now: dict[str, torch.Tensor]) -> None:
    """Fail in one line, naming the first tensor whose shape differs, when ``path`` was saved with other
    settings (another --rank, --lora_targets, --train_text_encoder, ...) than the run resuming from it."""
    from safetensors import safe_open

    with safe_open(str(path / "trained.safetensors"), "pt") as f:
        saved = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    now = {key: list(tensor.shape) for key, tensor in trained_now.items()}
    if saved != now:
        key = next(k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k))
        raise ConfigError(
            f"--resume_from_checkpoint {path} was saved with other settings: {key} is {saved.get(key, 'absent')} "
            f"there and {now.get(key, 'absent')} now (another --rank, --lora_targets, --train_text_encoder, ...?); "
            "resume with the settings it was saved with, or start a new --output_dir")
