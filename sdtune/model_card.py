"""The model card (README.md) written beside every export: Hub metadata, usage, training settings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from sdtune.errors import ConfigError

METHOD_TAGS = {"lora": "lora", "dreambooth": "dreambooth", "textual-inversion": "textual-inversion", "controlnet": "controlnet"}
BASE_TAGS = ["stable-diffusion", "text-to-image", "diffusers"]
SECRET_KEY_PARTS = ("token", "secret", "password", "key")
# Files diffusers loads itself; any other top-level .safetensors is for AUTOMATIC1111/ComfyUI.
DIFFUSERS_FILES = {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "learned_embeds_2.safetensors",
                   "diffusion_pytorch_model.safetensors"}
SDXL_PIPELINE = "StableDiffusionXLPipeline"
UI_FOLDERS = {
    "lora": "models/Lora",
    "dreambooth": "models/Stable-diffusion (ComfyUI: models/checkpoints)",
    "textual-inversion": "embeddings (ComfyUI: models/embeddings)",
    "controlnet": "models/ControlNet (ComfyUI: models/controlnet)",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HF_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without secrets: keys naming a token, secret, password or key, at any depth.

    Over-eager on purpose (``keep_tokens`` goes too): a card is public, a lost setting is not.
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if any(part in str(key).lower() for part in SECRET_KEY_PARTS):
            continue
        if isinstance(value, dict):
            value = public_settings(value)
        elif isinstance(value, str) and _HF_TOKEN_VALUE.search(value):
            continue
        out[key] = value
    return out


def write_model_card(
    output_dir: str | Path,
    *,
    method: str,
    base_model: str,
    instance_prompt: str | None,
    trigger_words: list[str] | None,
    training_settings: dict[str, Any],
    sample_images: list[Path] | None,
    repo_id: str | None = None,
    license: str = "creativeml-openrail-m",
    pipeline_class: str = "StableDiffusionPipeline",
) -> Path:
    """Write ``README.md`` in ``output_dir``: Hub metadata (YAML) and a body on how to use the result.

    Args:
        output_dir: The export folder; the card describes the files found there.
        method: ``"lora"``, ``"dreambooth"``, ``"textual-inversion"`` or ``"controlnet"``.
        base_model: The model trained on: a Hub id goes into the metadata, a local path only into the text.
        instance_prompt: The prompt that calls the learned concept, if any.
        trigger_words: Words that must appear in a prompt (e.g. ``["sks"]`` or ``["<cat-toy>"]``).
        training_settings: Resolved options, shown as a table; secrets are dropped (see ``public_settings``).
        sample_images: Images to show; ones outside ``output_dir`` are copied to ``output_dir/images``.
        repo_id: The Hub repository the folder will be pushed to (used in the code snippet).
        license: The license id of the weights (the base model's license usually carries over).
        pipeline_class: The diffusers pipeline of the base model's family (``StableDiffusionXLPipeline`` for SDXL).

    Returns:
        The path of the written README.md.

    Raises:
        ConfigError: If ``method`` is unknown or a sample image does not exist.
    """
    method = method.replace("_", "-")
    if method not in METHOD_TAGS:
        raise ConfigError(f"unknown method '{method}' for the model card: use one of {', '.join(METHOD_TAGS)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images = [_image_in(output_dir, Path(p)) for p in sample_images or []]
    on_hub = bool(_HUB_ID.fullmatch(base_model)) and not Path(base_model).exists()
    data = ModelCardData(
        base_model=base_model if on_hub else None,
        tags=[*BASE_TAGS, *(["stable-diffusion-xl"] if pipeline_class == SDXL_PIPELINE else []), METHOD_TAGS[method], "sdtune"],
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        instance_prompt=instance_prompt,
        widget=[{"text": instance_prompt or "", "output": {"url": image}} for image in images] or None,
    )
    body = _body(output_dir, method, base_model, instance_prompt, trigger_words or [], training_settings, images, repo_id,
                 pipeline_class)
    path = output_dir / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)
    return path


def _image_in(output_dir: Path, image: Path) -> str:
    """The image's path relative to ``output_dir``, copying it in first if it lies elsewhere."""
    if not image.is_file():
        raise ConfigError(f"sample image {image} does not exist: pass images the run wrote, or none")
    try:
        return image.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        target = output_dir / "images" / image.name
        target.parent.mkdir(exist_ok=True)
        index = 1
        while target.exists():
            target, index = target.with_name(f"{image.stem}-{index}{image.suffix}"), index + 1
        shutil.copy2(image, target)
        return target.relative_to(output_dir).as_posix()


def _snippet(method: str, source: str, prompt: str, base_model: str, pipeline_class: str) -> str:
    source, prompt, base_model = json.dumps(source), json.dumps(prompt), json.dumps(base_model)  # quoted, escaped
    pipeline = f"pipe = {pipeline_class}.from_pretrained({{}}, torch_dtype=dtype).to(device)"
    embeddings = f"pipe.load_textual_inversion({source})"
    if pipeline_class == SDXL_PIPELINE:  # one file per text encoder, as diffusers' SDXL textual-inversion script writes
        embeddings = (f"pipe.load_textual_inversion({source}, weight_name=\"learned_embeds.safetensors\")\n"
                      f"pipe.load_textual_inversion({source}, weight_name=\"learned_embeds_2.safetensors\", "
                      "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)")
    imports, call = pipeline_class, f"pipe({prompt})"
    if method == "controlnet":  # the family's ControlNet pipeline, steered by a control map
        imports = pipeline_class.replace("Pipeline", "ControlNetPipeline")
        pipeline = (f"controlnet = ControlNetModel.from_pretrained({source}, torch_dtype=dtype)\n"
                    f"pipe = {imports}.from_pretrained({{}}, controlnet=controlnet, torch_dtype=dtype).to(device)")
        imports = f"ControlNetModel, {imports}\nfrom diffusers.utils import load_image"
        call = f"pipe({prompt}, image=load_image(\"control.png\"))"
    load = {
        "lora": f"{pipeline.format(base_model)}\npipe.load_lora_weights({source})",
        "dreambooth": pipeline.format(source),
        "textual-inversion": f"{pipeline.format(base_model)}\n{embeddings}",
        "controlnet": pipeline.format(base_model),
    }[method]
    return (
        f"```python\nimport torch\nfrom diffusers import {imports}\n\n"
        "device = \"cuda\" if torch.cuda.is_available() else \"mps\" if torch.backends.mps.is_available() else \"cpu\"\n"
        "dtype = torch.float32 if device == \"cpu\" else torch.float16  # fp16 is slow or unsupported on CPUs\n"
        f"{load}\nimage = {call}.images[0]\nimage.save(\"sample.png\")\n```"
    )


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _body(
    output_dir: Path, method: str, base_model: str, instance_prompt: str | None, trigger_words: list[str],
    settings: dict[str, Any], images: list[str], repo_id: str | None, pipeline_class: str,
) -> str:
    what = {
        "lora": "LoRA adapter weights",
        "dreambooth": "a DreamBooth fine-tune (a full diffusers pipeline)",
        "textual-inversion": "a textual-inversion embedding",
        "controlnet": "a ControlNet",
    }[method]
    name = repo_id.split("/")[-1] if repo_id else output_dir.resolve().name
    prompt = instance_prompt or (trigger_words[0] if trigger_words else "a photo")
    lines = [f"# {name}", "", f"{what[0].upper()}{what[1:]} for `{base_model}`, trained with sdtune.", ""]
    if instance_prompt:
        lines += [f"Instance prompt: `{instance_prompt}`", ""]
    if trigger_words:
        lines += ["## Trigger words", "", "Use these in your prompt: " + ", ".join(f"`{w}`" for w in trigger_words), ""]
    if images:
        lines += ["## Samples", "", *[f"![sample {i}]({image})" for i, image in enumerate(images, 1)], ""]
    lines += ["## Use with diffusers", "", _snippet(method, repo_id or str(output_dir), prompt, base_model, pipeline_class), ""]
    ui_files = sorted(p.name for p in output_dir.glob("*.safetensors") if p.name not in DIFFUSERS_FILES)
    if ui_files:
        lines += ["## Use in AUTOMATIC1111 / ComfyUI", ""]
        lines += [f"Put `{f}` in `{UI_FOLDERS[method]}`." for f in ui_files] + [""]
    public = public_settings(settings)
    if public:
        lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in public.items()] + [""]
    return "\n".join(lines)


def write_training_card(output_dir: str | Path, config: Any, card_type: str, sample_images: list[Path],
                        pipeline_class: str = "StableDiffusionPipeline") -> Path:
    """The card of a training run, from its config (secrets are dropped by `public_settings`)."""
    return write_model_card(
        output_dir, method=card_type, base_model=str(config.pretrained_model_name_or_path),
        instance_prompt=config.instance_prompt,
        trigger_words=[config.placeholder_token] if config.placeholder_token else None,
        training_settings=config.to_dict(), sample_images=sample_images, repo_id=config.hub_model_id,
        pipeline_class=pipeline_class,
    )
