"""DreamBooth as a full fine-tune: every UNet weight (and optionally the text encoder) is trained.

DreamBooth-LoRA is the LoRA method run with a DreamBoothConfig (see sdtune.api); prior
preservation is data (class images with their own loss weight), so neither method has a branch for it.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdtune.config import DreamBoothConfig
from sdtune.export import add_text_model_level_to_saved_text_encoder, save_precision_dtype, save_tokenizer_vocab_files
from sdtune.methods import MethodDefaults, text_encoder_learning_rates, trainable_parameters, unwrap_model
from sdtune.models import Components

SINGLE_FILE_NAME = "model.safetensors"


class DreamBoothMethod(MethodDefaults):
    default_caption = None
    card_type = "dreambooth"  # for the model card's tags and usage snippet

    def __init__(self, config: DreamBoothConfig):
        self.config = config
        self.ema: EMAModel | None = None

    @property
    def trains_text_encoder(self) -> bool:
        return self.config.train_text_encoder

    def text_encoder_trains_at(self, step: int) -> bool:
        stop = self.config.stop_text_encoder_training
        return self.config.train_text_encoder and (stop is None or step < stop)

    def transform_caption(self, caption: str, rng) -> str:
        return caption

    def stopped_param_groups(self, step: int) -> set[int]:
        # groups: unet, then one per text encoder (SDXL has two)
        if self.config.train_text_encoder and not self.text_encoder_trains_at(step):
            return set(range(1, self._num_groups))
        return set()

    def prepare(self, components: Components) -> list[dict]:
        # Trained weights are fp32 masters whatever the mixed precision; frozen parts keep the weight dtype.
        components.unet.to(torch.float32).requires_grad_(True).train()
        groups = [{"params": trainable_parameters(components.unet), "lr": self.config.learning_rate}]
        if self.config.train_text_encoder:
            for name, lr in text_encoder_learning_rates(self.config, components).items():
                text_encoder = getattr(components, name)
                text_encoder.to(torch.float32).requires_grad_(True).train()
                groups.append({"params": trainable_parameters(text_encoder), "lr": lr})
        self._num_groups = len(groups)
        if self.config.use_ema:
            unet = components.unet
            self.ema = EMAModel(unet.parameters(), decay=self.config.ema_decay, model_cls=UNet2DConditionModel,
                                model_config=unet.config)
            self.ema.to(unet.device)
        return groups

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet, *components.text_encoders] if self.config.train_text_encoder else [components.unet]

    def _trained_parts(self, components: Components) -> dict[str, torch.nn.Module]:
        """The trained modules by pipeline name (the checkpoint's key prefixes and folders)."""
        names = ("unet", *components.conditioning.encoder_names) if self.config.train_text_encoder else ("unet",)
        return {name: unwrap_model(getattr(components, name)) for name in names}

    def after_step(self, components: Components) -> None:
        if self.ema is not None:
            self.ema.step(unwrap_model(components.unet).parameters())

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        state = {f"{name}.{k}": v for name, model in self._trained_parts(components).items() for k, v in model.state_dict().items()}
        if self.ema is not None:
            state.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
            state["ema.optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        for name, model in self._trained_parts(components).items():
            model.load_state_dict({k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")})
        if self.ema is not None:
            for i, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(state_dict[f"ema.{i}"])
            self.ema.optimization_step = int(state_dict["ema.optimization_step"])

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        """A `save_pretrained` pipeline folder in fp32 (EMA weights when --use_ema), and optionally one single file.

        The pipeline folder is fp32, as diffusers saves it: a plain ``from_pretrained`` then loads
        every component in one dtype. --save_precision sets the single file's dtype. Casts are
        made on copies, so the trained weights stay as they are.
        """
        output_dir = Path(output_dir)
        names = components.conditioning.encoder_names
        with self._exported_unet(components) as unet:
            text_encoders = {name: _fp32(unwrap_model(getattr(components, name))) for name in names}
            vae = _fp32(components.vae)
            pipe = dataclasses.replace(components, unet=unet, vae=vae, **text_encoders).pipeline()
            pipe.save_pretrained(output_dir, safe_serialization=True)
            # the layouts transformers 4 (and other tools) read, whichever transformers wrote the folder
            for name in names:
                save_tokenizer_vocab_files(output_dir / name.replace("text_encoder", "tokenizer"))
                add_text_model_level_to_saved_text_encoder(output_dir / name)
            outputs = {"pipeline": output_dir / "model_index.json"}
            if self.config.save_single_file:
                from sdtune.single_file import save_single_file

                outputs["single_file"] = save_single_file(output_dir / SINGLE_FILE_NAME, unet, vae, text_encoders["text_encoder"],
                                                          text_encoder_2=text_encoders.get("text_encoder_2"),
                                                          dtype=save_precision_dtype(self.config.save_precision),
                                                          carry_from=components.source_file)
        return outputs

    def export_checkpoint(self, components: Components, folder: Path) -> dict[str, Path]:
        """``unet/`` (the EMA weights with --use_ema, as diffusers' checkpoints) and ``text_encoder/`` when trained.

        Both load with ``from_pretrained(folder, subfolder=...)``; they are fp32, the trained weights.
        """
        folder = Path(folder)
        with self._exported_unet(components) as unet:
            unet.save_pretrained(folder / "unet", safe_serialization=True)
        outputs = {"unet": folder / "unet"}
        for name, model in self._trained_parts(components).items():
            if name != "unet":
                model.save_pretrained(folder / name, safe_serialization=True)
                add_text_model_level_to_saved_text_encoder(folder / name)
                outputs[name] = folder / name
        return outputs

    @contextmanager
    def _exported_unet(self, components: Components):
        """The UNet to export: the EMA weights while inside (when --use_ema), the training weights again after."""
        unet = unwrap_model(components.unet)
        if self.ema is None:
            yield unet
            return
        self.ema.store(unet.parameters())  # a host copy of the training weights
        self.ema.copy_to(unet.parameters())
        try:
            yield unet
        finally:
            self.ema.restore(unet.parameters())  # bit for bit: training goes on undisturbed


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` if it is fp32 already, else an fp32 copy (frozen parts sit in the fp16/bf16 weight dtype)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)
