"""ControlNet: a trainable copy of the UNet's encoder, whose zero-initialised outputs are added to the
frozen UNet's skip connections, steered by a control map (edges, a mask, a pose) per image.

A new ControlNet is ``ControlNetModel.from_unet`` of the base (as diffusers' ``train_controlnet.py``):
its zero convolutions make the untrained ControlNet leave the base's output exactly as it was.
The control map is one more input of the batch, placed like its image (data.control_images).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel

from sdtune.config import ControlNetConfig
from sdtune.data.control_images import attach_control_images
from sdtune.export import save_precision_dtype
from sdtune.methods import unwrap_model
from sdtune.models import Components

SINGLE_FILE_NAME = "controlnet.safetensors"
CHECKPOINT_FOLDER = "controlnet"  # what diffusers' train_controlnet.py names it in checkpoint-N/
_HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' (and the original ControlNet's) conditioning-embedding widths


def conditioning_embedding_channels(vae) -> tuple[int, ...]:
    """Widths of the conditioning embedding: one stride-2 stage per VAE downsampling, so a control map at
    image resolution comes out at the latents' size (SD's VAE downsamples 8x: the usual four widths)."""
    downsamplings = len(vae.config.block_out_channels) - 1
    if downsamplings + 1 > len(_HINT_CHANNELS):
        raise ValueError(f"a VAE that downsamples {2 ** downsamplings}x has no ControlNet conditioning embedding here")
    return _HINT_CHANNELS[: downsamplings + 1]


def load_controlnet(source: str, option: str = "--controlnet_model_name_or_path",
                    dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """A ControlNet from a diffusers folder, a Hub id, or a single .safetensors file (original or diffusers layout).

    A single file's architecture is read from a ``config.json`` beside it (sdtune's output folders have
    one), else inferred by diffusers from the weights (SD 1.5 / SDXL ControlNets).
    """
    from sdtune.models import one_line_load_errors

    with one_line_load_errors(option, source, "pass a ControlNet folder (config.json + weights), a Hub id or a .safetensors file",
                              "the ControlNet"):
        path = Path(source)
        if path.is_file():
            beside = path.parent / "config.json"
            config = {"config": str(path.parent)} if beside.is_file() else {}
            return ControlNetModel.from_single_file(source, torch_dtype=dtype, **config)
        return ControlNetModel.from_pretrained(source, torch_dtype=dtype)


class ControlNetMethod:
    default_caption = None
    card_type = "controlnet"  # for the model card's tags and usage snippet
    trains_text_encoder = False

    def __init__(self, config: ControlNetConfig):
        self.config = config
        self.controlnet: ControlNetModel | None = None

    def text_encoder_trains_at(self, step: int) -> bool:
        return False

    def transform_caption(self, caption: str, rng) -> str:
        return caption

    def stopped_param_groups(self, step: int) -> set[int]:
        return set()

    def attach_inputs(self, records: list) -> list:
        config = self.config
        source = config.dataset_name or config.instance_data_dir or config.train_data_dir  # find_records's order
        return attach_control_images(records, image_folder=source,
                                     conditioning_data_dir=config.conditioning_data_dir,
                                     conditioning_image_column=config.conditioning_image_column)

    def prepare(self, components: Components) -> list[dict]:
        """The UNet and text encoders stay frozen (as loaded); the ControlNet trains in fp32."""
        if self.config.controlnet_model_name_or_path:
            controlnet = load_controlnet(self.config.controlnet_model_name_or_path)
        else:
            controlnet = ControlNetModel.from_unet(
                components.unet, conditioning_embedding_out_channels=conditioning_embedding_channels(components.vae))
        if controlnet.dtype != torch.float32:  # copied from a bf16/fp16 UNet, or a half-precision file
            controlnet = controlnet.float()
        self.controlnet = controlnet.to(components.unet.device).requires_grad_(True).train()
        if self.config.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        return [{"params": list(self.controlnet.parameters()), "lr": self.config.learning_rate}]

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        return [self.controlnet]

    def extra_unet_inputs(self, forward_module, noisy_latents, timesteps, unet_inputs, batch) -> dict:
        """The ControlNet's residuals for the UNet's skip connections and middle block."""
        control = batch["conditioning_pixel_values"].to(noisy_latents.device, noisy_latents.dtype)
        down, mid = forward_module(self.controlnet)(noisy_latents, timesteps, controlnet_cond=control,
                                                    return_dict=False, **unet_inputs)
        dtype = noisy_latents.dtype  # the frozen UNet's dtype
        return {"down_block_additional_residuals": [residual.to(dtype) for residual in down],
                "mid_block_additional_residual": mid.to(dtype)}

    def validation_controls(self, components: Components):
        if not self.config.validation_image:
            return None
        from sdtune.control import read_control_images

        images = read_control_images(self.config.validation_image, "--validation_image",
                                     size=(self.config.resolution, self.config.resolution))
        controlnet, dtype = unwrap_model(self.controlnet), components.unet.dtype
        if dtype != torch.float32:
            # A copy in the frozen UNet's dtype, built fresh: under mixed precision accelerate patched the trained
            # module's forward to return fp32, and fp32 residuals added to the UNet's bf16 activations reach its
            # bf16 norms as fp32 (an error on the CPU).
            copy = ControlNetModel.from_config(controlnet.config)
            copy.load_state_dict(controlnet.state_dict())
            controlnet = copy.to(controlnet.device, dtype).eval()
        return controlnet, images

    def after_step(self, components: Components) -> None:
        pass

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        return {f"controlnet.{k}": v for k, v in unwrap_model(self.controlnet).state_dict().items()}

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        unwrap_model(self.controlnet).load_state_dict({k.removeprefix("controlnet."): v for k, v in state_dict.items()})

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        """The diffusers folder (``ControlNetModel.from_pretrained(output_dir)``, fp32, as diffusers' script
        writes it) and, with --save_single_file, the original-layout file for ComfyUI and A1111."""
        output_dir = Path(output_dir)
        controlnet = unwrap_model(self.controlnet)
        controlnet.save_pretrained(output_dir, safe_serialization=True)
        outputs = {"controlnet": output_dir / "config.json"}
        if self.config.save_single_file:
            from sdtune.single_file import save_controlnet_single_file

            outputs["single_file"] = save_controlnet_single_file(output_dir / SINGLE_FILE_NAME, controlnet,
                                                                 dtype=save_precision_dtype(self.config.save_precision))
        return outputs

    def export_checkpoint(self, components: Components, folder: Path) -> dict[str, Path]:
        folder = Path(folder) / CHECKPOINT_FOLDER
        unwrap_model(self.controlnet).save_pretrained(folder, safe_serialization=True)
        return {"controlnet": folder}

