"""What a training run can check before importing torch and diffusers (6 s on a quiet machine, 20-45 s
under load): options that go together, paths that must exist, the output folder, the Hub when offline.

The CLI runs these before it imports the trainers, and the trainer runs them again for the Python API;
none of them imports torch. Checks that need torch (a CUDA device for 8-bit AdamW) come right after,
still before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import TrainConfig, check_ready_to_train
from sdtune.errors import ConfigError, DataError, ModelLoadError
from sdtune.run_identity import check_output_dir

def looks_like_local_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a path on disk."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def hub_offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (what an upload would meet)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_before_imports(config: TrainConfig) -> list[Path]:
    """Refuse, in one line each, what is wrong before any work starts.

    Returns:
        The earlier run's checkpoints that --overwrite_output_dir deletes (see sdtune.run_identity).

    Raises:
        ConfigError, DataError, ModelLoadError: the option named, and what to do.
    """
    check_ready_to_train(config)
    for option in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "single_file_config",
                   "controlnet_model_name_or_path"):
        value = getattr(config, option, None)  # the last is ControlNet's only
        if value and value != "none" and looks_like_local_path(value) and not Path(value).expanduser().exists():
            raise ModelLoadError(f"--{option} {value}: no such file or folder")
    for option in ("instance_data_dir", "train_data_dir", "conditioning_data_dir"):
        value = getattr(config, option, None)  # the last is ControlNet's only
        if value and not Path(value).is_dir():
            raise DataError(f"--{option} {value}: no such folder")
    if config.push_to_hub and hub_offline():
        raise ConfigError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set (offline); unset it, or train without "
                          "--push_to_hub and upload later with `sdtune push OUTPUT_DIR --repo_id ...`")
    return check_output_dir(Path(config.output_dir), resuming=bool(config.resume_from_checkpoint),
                            overwrite=config.overwrite_output_dir)
