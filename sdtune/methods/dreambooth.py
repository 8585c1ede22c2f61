"""DreamBooth as a full fine-tune: every UNet weight (and optionally the text encoder) is trained.

DreamBooth-LoRA is the LoRA method run with a DreamBoothConfig (see sdtune.api); prior
preservation is data (class images with their own loss weight), so neither method has a branch for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdtune.config import DreamBoothConfig
from sdtune.export import save_precision_dtype
from sdtune.methods import trainable_parameters, unwrap_model
from sdtune.models import Components

SINGLE_FILE_NAME = "model.safetensors"


class DreamBoothMethod:
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
        return {1} if self.config.train_text_encoder and not self.text_encoder_trains_at(step) else set()

    def prepare(self, components: Components) -> list[dict]:
        # Trained weights are fp32 masters whatever the mixed precision; frozen parts keep the weight dtype.
        components.unet.to(torch.float32).requires_grad_(True).train()
        groups = [{"params": trainable_parameters(components.unet), "lr": self.config.learning_rate}]
        if self.config.train_text_encoder:
            components.text_encoder.to(torch.float32).requires_grad_(True).train()
            lr = self.config.text_encoder_lr if self.config.text_encoder_lr is not None else self.config.learning_rate
            groups.append({"params": trainable_parameters(components.text_encoder), "lr": lr})
        if self.config.use_ema:
            unet = components.unet
            self.ema = EMAModel(unet.parameters(), decay=self.config.ema_decay, model_cls=UNet2DConditionModel,
                                model_config=unet.config)
            self.ema.to(unet.device)
        return groups

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet, components.text_encoder] if self.config.train_text_encoder else [components.unet]

    def after_step(self, components: Components) -> None:
        if self.ema is not None:
            self.ema.step(unwrap_model(components.unet).parameters())

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in unwrap_model(components.unet).state_dict().items()}
        if self.config.train_text_encoder:
            state.update({f"text_encoder.{k}": v for k, v in unwrap_model(components.text_encoder).state_dict().items()})
        if self.ema is not None:
            state.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
            state["ema.optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        for prefix, model in (("unet.", components.unet), ("text_encoder.", components.text_encoder)):
            part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if part:
                unwrap_model(model).load_state_dict(part)
        if self.ema is not None:
            for i, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(state_dict[f"ema.{i}"])
            self.ema.optimization_step = int(state_dict["ema.optimization_step"])

    def save_checkpoint_outputs(self, components: Components, folder: Path) -> None:
        unwrap_model(components.unet).save_pretrained(folder / "unet", safe_serialization=True)
        if self.config.train_text_encoder:
            unwrap_model(components.text_encoder).save_pretrained(folder / "text_encoder", safe_serialization=True)

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        """A `save_pretrained` pipeline folder (EMA weights when --use_ema), and optionally one single file.

        Export is the last thing a run does: the weights are cast to --save_precision in place.
        """
        unet = unwrap_model(components.unet)
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        dtype = save_precision_dtype(self.config.save_precision)
        text_encoder = unwrap_model(components.text_encoder)
        for module in (unet, text_encoder, components.vae):
            module.to(dtype)
        pipe = components.pipeline()
        pipe.unet, pipe.text_encoder = unet, text_encoder
        pipe.save_pretrained(output_dir, safe_serialization=True)
        outputs = {"pipeline": Path(output_dir) / "model_index.json"}
        if self.config.save_single_file:
            from sdtune.single_file import save_single_file

            outputs["single_file"] = save_single_file(Path(output_dir) / SINGLE_FILE_NAME, unet, components.vae,
                                                      text_encoder, dtype=dtype)
        return outputs
