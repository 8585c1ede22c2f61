"""Which run an output folder and its checkpoints belong to, so two runs are never mixed silently.

- A new run refuses an ``--output_dir`` that holds an earlier run's checkpoints: resuming with
  ``latest`` would otherwise reach back into that run (its weights exported as the new run's).
  ``--overwrite_output_dir`` deletes them; ``--resume_from_checkpoint`` continues them.
- Each checkpoint records its run: the settings that decide what is learned and a hash of the
  training data. Resuming with other settings or data is allowed (changing the learning rate
  mid-run is common), but said, naming each difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from sdtune.errors import ConfigError

logger = logging.getLogger(__name__)

# Kept free of torch: the CLI checks --output_dir before it imports the trainers.
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp`` folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


# Options that do not change what a step learns: where things go, how long, how often, how fast.
BOOKKEEPING = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_steps",
    "validation_epochs", "validation_inference_steps", "eval_steps", "eval_metrics", "eval_config", "report_to", "logging_dir", "tracker_project_name",
    "push_to_hub", "hub_model_id", "hub_private", "dataloader_num_workers", "cache_dir", "cache_latents",
    "cache_text_embeddings", "vae_batch_size", "sample_batch_size", "reuse_host_memory", "compile", "channels_last",
    "num_threads",
    "fused_optimizer", "set_grads_to_none", "allow_tf32", "gradient_checkpointing", "save_single_file",
    "save_precision", "save_as_full_pipeline", "caption_missing", "caption_model",
    # folders: their content is compared through the data hash, so a moved folder is the same data
    "instance_data_dir", "train_data_dir", "class_data_dir",
})


def check_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool) -> list[Path]:
    """Refuse a file as --output_dir, and a folder with an earlier run's checkpoints unless told what to do.

    Returns the earlier checkpoints that ``--overwrite_output_dir`` asks to delete (see :func:`clear_checkpoints`).

    Raises:
        ConfigError: one line naming the option and the ways forward.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is a file; pass a folder (it is created if missing)")
    if resuming and overwrite:
        raise ConfigError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue; pass one of them")
    earlier = list_checkpoints(output_dir)
    if earlier and not resuming and not overwrite:
        raise ConfigError(
            f"--output_dir {output_dir} holds {earlier[-1].name} of an earlier run; continue it with "
            "--resume_from_checkpoint latest, start anew there with --overwrite_output_dir (deletes its checkpoints), "
            "or pick another --output_dir")
    return earlier if overwrite else []


def clear_checkpoints(checkpoints: list[Path]) -> None:
    """Delete an earlier run's checkpoints (main process only; --overwrite_output_dir)."""
    for folder in checkpoints:
        shutil.rmtree(folder)
    if checkpoints:
        logger.info("--overwrite_output_dir: deleted %d checkpoint(s) of an earlier run (%s)", len(checkpoints),
                    ", ".join(p.name for p in checkpoints))


def run_identity(config_dict: dict, data_fingerprint: str) -> dict:
    """What a checkpoint records of its run: the learning-relevant settings and the data's hash.

    In the JSON form a checkpoint stores (tuples as lists), so a saved identity compares equal to a new one."""
    settings = {k: v for k, v in config_dict.items() if k not in BOOKKEEPING}
    return json.loads(json.dumps({"settings": settings, "data": data_fingerprint}))


def data_fingerprint(samples) -> str:
    """A hash of the training samples: each image's content, crop, caption, loss weight and control map, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        control = f"|{sample.control_hash}" if sample.control_hash else ""  # unchanged for runs without control maps
        digest.update(f"{sample.image_hash}|{sample.placement}|{sample.caption}|{sample.loss_weight}{control}\n".encode())
    return digest.hexdigest()


def differences(saved: dict | None, now: dict) -> list[str]:
    """What differs between a checkpoint's run and this one, one phrase each ([] when they match)."""
    if not saved:
        return ["it records no run settings (written by an older sdtune)"]
    changed = []
    old, new = saved.get("settings", {}), now["settings"]
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            changed.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    if saved.get("data") != now["data"]:
        changed.append("the training data (images, crops, captions or class images) differ")
    return changed


def check_resume(path: Path, saved_run: dict | None, now: dict, step: int, max_train_steps: int) -> None:
    """Refuse a checkpoint past the end of this run; say so when it was trained with other settings or data.

    Raises:
        ConfigError: the checkpoint's step is past --max_train_steps.
    """
    if step > max_train_steps:
        raise ConfigError(f"--resume_from_checkpoint {path} is at step {step}, past --max_train_steps {max_train_steps}; "
                          f"pass --max_train_steps {step} or more, or resume an earlier checkpoint")
    changed = differences(saved_run, now)
    if changed:
        logger.warning("resuming %s, which was trained with other settings: %s", path, "; ".join(changed))
