"""LoRA (and DoRA) adapters on the UNet and optionally the text encoder, through peft."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdtune.config import LoRAConfig
from sdtune.export import (
    BUNDLE_TOKENS_METADATA,
    DIFFUSERS_LORA_FILE,
    a1111_embedding_name,
    kohya_embedding_bundle,
    save_kohya_lora,
    with_text_model_level,
)
from sdtune.methods import MethodDefaults, text_encoder_learning_rates, trainable_parameters, unwrap_model
from sdtune.methods.embeddings import NewTokenEmbeddings, a1111_vectors, save_embedding_files
from sdtune.models import Components

# Module-name patterns (full match against UNet module paths) for --lora_targets.
_ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
_RESNET = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)"
UNET_TARGETS = {
    "attn": [_ATTENTION],
    "attn_ff": [_ATTENTION, _TRANSFORMER],  # kohya's default LoRA: the whole transformer block
    "all": [_ATTENTION, _TRANSFORMER, _RESNET],  # + convolutions (LoCon / kohya conv_dim)
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"
KOHYA_LORA_FILE = "kohya_lora.safetensors"  # for AUTOMATIC1111 / ComfyUI (models/Lora)


def unet_target_modules(unet: torch.nn.Module, targets: str) -> list[str]:
    """The UNet module paths --lora_targets selects (explicit names make exports easy to inspect)."""
    patterns = [re.compile(p) for p in UNET_TARGETS[targets]]
    return [name for name, _ in unet.named_modules() if any(p.fullmatch(name) for p in patterns)]


class LoRAMethod(MethodDefaults):
    """Trains low-rank adapters; the base weights never change.

    With ``train_text_embeddings`` (pivotal tuning) it also learns new token embeddings, with their
    own learning rate, for the first ``train_text_embeddings_frac`` of the steps.
    """

    default_caption = None
    card_type = "lora"  # for the model card's tags and usage snippet

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.lora_alpha = config.lora_alpha if config.lora_alpha is not None else float(config.rank)
        self.unet_targets: list[str] = []
        self.embeddings = None
        if config.train_text_embeddings:
            self.embeddings = NewTokenEmbeddings(config.placeholder_token, config.initializer_token, config.num_vectors)

    @property
    def trains_text_encoder(self) -> bool:
        return self.config.train_text_encoder or self.embeddings is not None

    def _learns_embeddings_at(self, step: int) -> bool:
        return self.embeddings is not None and step < self.config.train_text_embeddings_frac * self.config.max_train_steps

    def text_encoder_trains_at(self, step: int) -> bool:
        return self.config.train_text_encoder or self._learns_embeddings_at(step)

    def stopped_param_groups(self, step: int) -> set[int]:
        # groups: unet, [one per text-encoder LoRA], [embeddings] -- the embeddings group is always last
        if self.embeddings is not None and not self._learns_embeddings_at(step):
            return {self._num_groups - 1}
        return set()

    def transform_caption(self, caption: str, rng) -> str:
        return self.embeddings.expand(caption) if self.embeddings is not None else caption

    def _lora_config(self, target_modules: list[str]) -> LoraConfig:
        return LoraConfig(
            r=self.config.rank, lora_alpha=self.lora_alpha, lora_dropout=self.config.lora_dropout,
            use_dora=self.config.use_dora, init_lora_weights="gaussian", target_modules=target_modules,
        )

    def prepare(self, components: Components) -> list[dict]:
        if self.trains_text_encoder:
            for text_encoder in components.text_encoders:
                text_encoder.train()  # gradient checkpointing and LoRA dropout act only in train mode
        components.unet.train()
        embedding_weights = self.embeddings.add_to(components) if self.embeddings is not None else []
        self.unet_targets = unet_target_modules(components.unet, self.config.lora_targets)
        components.unet.add_adapter(self._lora_config(self.unet_targets), adapter_name=ADAPTER_NAME)
        groups = [{"params": trainable_parameters(components.unet), "lr": self.config.learning_rate}]
        if self.config.train_text_encoder:
            for name, lr in text_encoder_learning_rates(self.config, components).items():
                text_encoder = getattr(components, name)
                text_encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS), adapter_name=ADAPTER_NAME)
                groups.append({"params": [p for p in trainable_parameters(text_encoder)
                                          if not any(p is w for w in embedding_weights)], "lr": lr})
            for weight in embedding_weights:
                weight.requires_grad_(True)  # peft froze every non-LoRA weight, the new embeddings too
        if embedding_weights:
            groups.append({"params": embedding_weights, "lr": self.config.text_embeddings_lr})
        self._num_groups = len(groups)
        # fp16/bf16 runs keep the frozen base in the weight dtype; trained weights must be fp32
        # or the grad scaler fails ("Attempting to unscale FP16 gradients").
        cast_training_params(self.trained_models(components), dtype=torch.float32)
        return groups

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet, *components.text_encoders] if self.trains_text_encoder else [components.unet]

    def after_step(self, components: Components) -> None:
        if self.embeddings is not None:
            self.embeddings.restore_frozen_rows(components)

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        unet, text_encoders = self.lora_state_dicts(components)
        state = {f"unet.{k}": v for k, v in unet.items()}
        for name, lora in text_encoders.items():
            state.update({f"{name}.{k}": v for k, v in lora.items()})
        if self.embeddings is not None:
            state.update(self.embeddings.state_dict(components, "text_embeddings"))
        return state

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        if self.embeddings is not None:
            self.embeddings.load_state_dict(components, state_dict, "text_embeddings")
        for name in ("unet", *components.conditioning.encoder_names):
            part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
            if part:
                result = set_peft_model_state_dict(unwrap_model(getattr(components, name)), part, adapter_name=ADAPTER_NAME)
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise RuntimeError(f"checkpoint holds LoRA weights the model lacks: {unexpected[:3]}")

    def lora_state_dicts(self, components: Components) -> tuple[dict, dict[str, dict]]:
        """(UNet LoRA, {text encoder name: its LoRA}) as peft state dicts; no text encoders unless trained."""
        unet = get_peft_model_state_dict(unwrap_model(components.unet))
        text_encoders = {}
        if self.config.train_text_encoder:
            text_encoders = {name: get_peft_model_state_dict(unwrap_model(getattr(components, name)), save_embedding_layers=False)
                             for name in components.conditioning.encoder_names}
        return unet, text_encoders

    def _save_diffusers_lora(self, components: Components, output_dir: Path, unet_sd: dict, text_encoder_sds: dict) -> Path:
        # rank_pattern and alpha_pattern (empty): diffusers 0.34 reads them from the metadata unconditionally
        metadata = {"r": self.config.rank, "lora_alpha": self.lora_alpha, "use_dora": self.config.use_dora,
                    "rank_pattern": {}, "alpha_pattern": {}}
        text_encoder_layers = {}
        for name, lora in text_encoder_sds.items():  # text_encoder[_2]_lora_layers and their metadata
            # with transformers 4's `text_model.` level, which diffusers 0.32 + transformers 4 need
            text_encoder_layers[f"{name}_lora_layers"] = with_text_model_level(lora)
            text_encoder_layers[f"{name}_lora_adapter_metadata"] = {**metadata, "target_modules": TEXT_ENCODER_TARGETS}
        type(components.pipeline()).save_lora_weights(
            output_dir,
            # peft key names (lora_A/lora_B) as diffusers' loader reads them; diffusers' own
            # convert_state_dict_to_diffusers renames attention keys only, and a file mixing both
            # spellings (conv targets) silently loses its attention LoRA on load.
            unet_lora_layers=unet_sd,
            unet_lora_adapter_metadata={**metadata, "target_modules": self.unet_targets},
            safe_serialization=True,
            **text_encoder_layers,
        )
        return output_dir / DIFFUSERS_LORA_FILE

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        unet_sd, text_encoder_sds = self.lora_state_dicts(components)
        outputs = {"diffusers": self._save_diffusers_lora(components, output_dir, unet_sd, text_encoder_sds)}
        bundle = None
        if self.embeddings is not None:  # pivotal tuning: the token travels with the LoRA
            vectors = self.embeddings.vectors(components)
            files = save_embedding_files(output_dir, self.config.placeholder_token, vectors)
            # the A1111/ComfyUI file too: ComfyUI ignores the bundle in the kohya file and loads models/embeddings
            renamed = {"diffusers": "embeddings", "diffusers_2": "embeddings_2", "a1111": "a1111_embedding"}
            outputs.update({renamed[kind]: path for kind, path in files.items()})
            bundle = kohya_embedding_bundle(self.config.placeholder_token, a1111_vectors(vectors))
        metadata = kohya_metadata(components, self.config)
        if bundle:
            metadata[BUNDLE_TOKENS_METADATA] = json.dumps({a1111_embedding_name(self.config.placeholder_token):
                                                           self.config.placeholder_token})
        sdxl = {"text_encoder_2_state_dict": text_encoder_sds.get("text_encoder_2"),
                "sdxl_unet": unwrap_model(components.unet)} if components.is_sdxl else {}
        outputs["kohya"] = save_kohya_lora(
            output_dir / KOHYA_LORA_FILE, unet_sd, text_encoder_sds.get("text_encoder"), alpha=self.lora_alpha,
            rank=self.config.rank, metadata=metadata, extra=bundle, **sdxl,
        )
        return outputs

    def export_checkpoint(self, components: Components, folder: Path) -> dict[str, Path]:
        return self.export(components, folder)  # reads the adapters, changes nothing


def kohya_metadata(components: Components, config: LoRAConfig) -> dict[str, str]:
    """The ``ss_*`` notes A1111 uses: SD 1 vs 2 vs XL (``ss_v2``, ``ss_base_model_version``) and names it shows."""
    # SD 2.x conditions on OpenCLIP ViT-H (1024 wide); SDXL's first encoder is CLIP ViT-L (768)
    v2 = not components.is_sdxl and components.text_encoder.config.hidden_size >= 1024
    v_prediction = components.prediction_type == "v_prediction"
    if components.is_sdxl:
        version = "sdxl_base_v1-0" + ("_v" if v_prediction else "")  # kohya's spelling
    else:
        version = ("sd_v2" if v2 else "sd_v1") + ("_768_v" if v2 and v_prediction else "_v" if v_prediction else "")
    return {
        "ss_base_model_version": version, "ss_v2": str(v2), "ss_sd_model_name": str(config.pretrained_model_name_or_path),
        "ss_output_name": Path(config.output_dir).name, "ss_network_module": "networks.lora",
    }
