"""Images from a (possibly half-trained) model: validation during training, and `generate`."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from sdtune.models import Components


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    generators: list[torch.Generator],
    *,
    size: tuple[int, int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    autocast=None,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """One image per (prompt, generator) at ``size`` (width, height), in one pipeline call.

    ``pipeline_kwargs`` go to the pipeline call (e.g. a ControlNet pipeline's control image and scale).

    ``autocast`` (the accelerator's) is used when the model mixes dtypes (fp32 trained weights on
    an fp16/bf16 frozen base) or runs on a GPU; an all-fp32 model on the CPU runs without it
    (autocast to bf16 is an order of magnitude slower there without AMX). The VAE decodes
    outside autocast, in its own dtype: it stays fp32 in fp16 runs because it overflows in fp16.
    """
    dtypes = {p.dtype for module in (pipe.unet, pipe.text_encoder, pipe.vae) for p in module.parameters()}
    use_autocast = autocast is not None and (pipe.unet.device.type != "cpu" or dtypes != {torch.float32})
    with autocast() if use_autocast else nullcontext():
        latents = pipe(
            prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            height=size[1], width=size[0], num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generators, output_type="latent", **pipeline_kwargs,
        ).images
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * len(images))


def sample_images(
    components: Components,
    prompt: str,
    *,
    num_images: int,
    seed: int,
    resolution: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    autocast=None,
    controls: tuple | None = None,
) -> list[Image.Image]:
    """``num_images`` validation images of ``prompt`` from the model being trained (adapters included).

    Image ``i`` uses seed ``seed + i``, so images of different steps are comparable. With
    ``controls`` (a ControlNet and its control maps), ``num_images`` images per control map.
    """
    scheduler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
    common = dict(size=(resolution, resolution), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  negative_prompt=negative_prompt, autocast=autocast)
    def generators():  # fresh per call: every control map gets the same seeds
        return [torch.Generator().manual_seed(seed + i) for i in range(num_images)]

    if controls is None:
        return generate(components.pipeline(scheduler=scheduler), [prompt] * num_images, generators(), **common)
    controlnet, maps = controls
    pipe = components.pipeline(scheduler=scheduler, controlnet=controlnet)
    return [image for control in maps for image in generate(pipe, [prompt] * num_images, generators(), image=control, **common)]


def save_images(images: list[Image.Image], folder: Path, stem: str = "image") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ generate

# name → (diffusers scheduler class, extra config)
SCHEDULER_TABLE = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion ships it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config):
    """A diffusers scheduler by its common UI name, on the model's own noise schedule."""
    import diffusers

    class_name, extra = SCHEDULER_TABLE[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)


def png_parameters(prompt: str, config, seed: int, size: tuple[int, int]) -> str:
    """Settings in AUTOMATIC1111's 'parameters' text, which A1111's PNG Info and many viewers read."""
    lines = [prompt]
    if config.negative_prompt:
        lines.append(f"Negative prompt: {config.negative_prompt}")
    fields = [f"Steps: {config.num_inference_steps}", f"Sampler: {config.scheduler}", f"CFG scale: {config.guidance_scale}",
              f"Seed: {seed}", f"Size: {size[0]}x{size[1]}", f"Model: {config.pretrained_model_name_or_path}"]
    if config.lora:
        fields.append(f"LoRA: {config.lora} ({config.lora_scale})")
    if config.embedding:
        fields.append(f"Embeddings: {config.embedding}")
    if config.init_image:
        fields.append(f"Denoising strength: {config.strength}")
    if config.controlnet:
        from sdtune.control import png_fields

        fields += png_fields(config)
    return "\n".join(lines + [", ".join(fields)])


def run_generate(config) -> list[Path]:
    """`sdtune generate`: load, add LoRA/embeddings, sample every prompt, save PNGs (+ grid). Returns the PNG paths."""
    from PIL import PngImagePlugin

    from sdtune.errors import ConfigError
    from sdtune.models import load_components

    prompts = _prompts(config)
    if not config.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required (a Hub id, a diffusers folder or a .safetensors file)")
    cuda = torch.cuda.is_available()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32) if cuda else torch.float32
    components = load_components(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
        single_file_config=config.single_file_config, allow_pickle=config.allow_pickle, weight_dtype=dtype,
        vae_name_or_path=config.pretrained_vae_model_name_or_path,
    )
    device = "cuda" if cuda else "cpu"
    native = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    size = (config.width or native, config.height or native)
    controls = None
    if config.controlnet:
        from sdtune.control import load_controls

        controls = load_controls(config, size, dtype, device)
    pipe = components.pipeline(scheduler=make_scheduler(config.scheduler, components.noise_scheduler.config),
                               controlnet=controls.pipeline_model if controls else None)
    pipe.to(device)
    _add_lora(pipe, config)
    _add_embeddings(pipe, config)
    if config.refiner and controls:
        raise ConfigError("--refiner and --controlnet cannot be combined yet; generate with one of them")
    refiner = _load_refiner(pipe, config, dtype) if config.refiner else None
    init = _init_image(config, size)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for p, prompt in enumerate(prompts):
        for i in range(config.num_images):
            seed = config.seed + i
            if init is not None and config.strength == 0:
                image = init.copy()  # nothing to denoise: strength 0 keeps the init image
            else:
                image = _one_image(pipe, prompt, config, seed, size, init, refiner, controls)
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", png_parameters(prompt, config, seed, size))
            path = out / f"{p:03d}-{i:02d}-seed{seed}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
            images.append(image)
    if config.grid and len(images) > 1:
        make_grid(images, columns=config.num_images).save(out / "grid.png")
    return paths


def _one_image(pipe, prompt: str, config, seed: int, size: tuple[int, int], init, refiner=None,
               controls=None) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    common = dict(negative_prompt=config.negative_prompt, num_inference_steps=config.num_inference_steps,
                  guidance_scale=config.guidance_scale)
    if controls is not None:
        common.update(controls.call_kwargs(img2img=init is not None))
    if refiner is not None:  # SDXL's ensemble of experts: the base denoises the first part, the refiner the rest
        latents = pipe(prompt, height=size[1], width=size[0], denoising_end=config.refiner_start, output_type="latent",
                       generator=generator, **common).images
        return refiner(prompt, image=latents, denoising_start=config.refiner_start, generator=generator, **common).images[0]
    if init is None:  # the function validation images come from, too
        return generate(pipe, [prompt], [generator], size=size, **common)[0]
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # the family's img2img pipeline over the same modules
    img2img.set_progress_bar_config(disable=True)
    return img2img(prompt, image=init, strength=config.strength, generator=generator, **common).images[0]


def _load_refiner(pipe, config, dtype: torch.dtype):
    """An SDXL refiner sharing the base's VAE and second text encoder (the refiner's only one), as diffusers documents."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from sdtune.errors import ConfigError
    from sdtune.models import one_line_load_errors

    if not hasattr(pipe, "text_encoder_2"):
        raise ConfigError(f"--refiner is for SDXL; {config.pretrained_model_name_or_path} is not an SDXL model")
    shared = dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, vae=pipe.vae, torch_dtype=dtype)
    with one_line_load_errors("--refiner", config.refiner, "pass an SDXL refiner folder, Hub id or .safetensors file",
                              "the refiner"):
        if Path(config.refiner).is_file():
            refiner = StableDiffusionXLImg2ImgPipeline.from_single_file(config.refiner, **shared)
        else:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(config.refiner, **shared)
    refiner.scheduler = make_scheduler(config.scheduler, refiner.scheduler.config)
    refiner.set_progress_bar_config(disable=True)
    return refiner.to(pipe.device)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """A contact sheet: ``columns`` images per row."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


def _prompts(config) -> list[str]:
    from sdtune.errors import ConfigError

    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts_file {path}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompts_file {path} holds no prompt (one per line)")
        return prompts
    if not config.prompt:
        raise ConfigError("pass --prompt 'a photo of ...' or --prompts_file FILE")
    return [config.prompt]


def _add_lora(pipe, config) -> None:
    if not config.lora:
        return
    from sdtune.errors import ConfigError
    from sdtune.export import DIFFUSERS_LORA_FILE

    path = Path(config.lora)
    if not path.exists():
        raise ConfigError(f"--lora {path}: no such file or folder")
    with _one_line_on_mismatch(f"--lora {path}", config):
        if path.is_file():
            _load_lora_file(pipe, path)
        else:
            # the file named: diffusers before ~0.40 cannot search a local folder offline, and without
            # one it looks for pytorch_lora_weights.bin, a pickle file sdtune never writes or loads
            candidates = [DIFFUSERS_LORA_FILE] if (path / DIFFUSERS_LORA_FILE).is_file() else sorted(
                p.name for p in path.glob("*.safetensors"))
            if len(candidates) != 1:
                found = f"{len(candidates)} .safetensors files ({', '.join(candidates[:3])})" if candidates else "no LoRA file"
                raise ConfigError(f"--lora {path}: the folder holds {found}; pass the LoRA file itself, or a folder with "
                                  f"{DIFFUSERS_LORA_FILE}")
            pipe.load_lora_weights(str(path), weight_name=candidates[0], adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[config.lora_scale])


def _load_lora_file(pipe, path: Path) -> None:
    """A diffusers or kohya LoRA file; embeddings bundled in a kohya file (pivotal tuning) are loaded too."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdtune.export import BUNDLE_TOKENS_METADATA, split_embedding_bundle

    lora, bundles = split_embedding_bundle(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        tokens = json.loads((f.metadata() or {}).get(BUNDLE_TOKENS_METADATA, "{}"))
    pipe.load_lora_weights(lora, adapter_name="lora")
    for name, vectors in bundles.items():
        _load_token_vectors(pipe, vectors, tokens.get(name, name))


@contextmanager
def _one_line_on_mismatch(what: str, config):
    """A LoRA or embedding of another base model fails deep in diffusers/peft, often with one line per
    weight; say it in one line instead (the loaders' log lines are silenced meanwhile)."""
    import logging

    from sdtune.errors import ConfigError

    quiet = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)  # diffusers logs the whole error once more
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        mismatch = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                             r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
        if mismatch:
            name, theirs, ours = mismatch.groups()
            detail = f"{name} is {theirs} in the file and {ours} in the model"
        else:
            detail = text[:160]
        raise ConfigError(f"{what} does not fit the base model {config.pretrained_model_name_or_path} "
                          f"(was it trained on another one, e.g. SD 1.x vs 2.x?): {detail}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _add_embeddings(pipe, config) -> None:
    if not config.embedding:
        return
    for item in (e.strip() for e in config.embedding.split(",") if e.strip()):
        token, vectors = _read_embedding(item)
        _check_embedding_widths(pipe, vectors, item, config)
        with _one_line_on_mismatch(f"--embedding {item}", config):
            _load_token_vectors(pipe, vectors, token)


def _read_embedding(item: str):
    """(token, vectors) of an embedding file or folder; vectors are one tensor, or SDXL's {"clip_l", "clip_g"}.

    diffusers files are ``{token: vectors}`` (SDXL: ``learned_embeds.safetensors`` + ``learned_embeds_2.safetensors``
    in a folder); A1111/ComfyUI files are ``emb_params`` or ``clip_l``/``clip_g``, named by the file.
    """
    from safetensors import safe_open

    from sdtune.errors import ConfigError
    from sdtune.export import LEARNED_EMBEDS_FILE, LEARNED_EMBEDS_FILE_2

    path = Path(item)
    folder = path if path.is_dir() else None
    if folder is not None:
        path = folder / LEARNED_EMBEDS_FILE
    if not path.is_file():
        raise ConfigError(f"--embedding {item}: no such file (pass a learned_embeds.safetensors, an A1111 embedding or their folder)")
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        token = (f.metadata() or {}).get("token", path.stem)
    if set(tensors) == {"emb_params"}:
        return token, tensors["emb_params"]
    if set(tensors) == {"clip_l", "clip_g"}:
        return token, tensors
    if len(tensors) != 1:
        raise ConfigError(f"--embedding {item}: not an embedding file (keys {', '.join(sorted(tensors))[:80]})")
    (token, vectors), = tensors.items()
    second = folder / LEARNED_EMBEDS_FILE_2 if folder is not None else None
    if second is not None and second.is_file():
        with safe_open(str(second), "pt") as f:
            vectors = {"clip_l": vectors, "clip_g": f.get_tensor(token)}
    return token, vectors


def _check_embedding_widths(pipe, vectors, item: str, config) -> None:
    from sdtune.errors import ConfigError

    sdxl = hasattr(pipe, "text_encoder_2")
    if isinstance(vectors, dict) != sdxl:
        kind = "an SDXL embedding (clip_l + clip_g)" if isinstance(vectors, dict) else "an SD 1.x/2.x embedding (one text encoder)"
        raise ConfigError(f"--embedding {item} is {kind}, which does not fit the base model "
                          f"{config.pretrained_model_name_or_path}; it was trained on another model family")
    ours = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2} if sdxl else {"emb_params": pipe.text_encoder}
    theirs = vectors if sdxl else {"emb_params": vectors}
    for key, encoder in ours.items():
        width, their_width = encoder.config.hidden_size, theirs[key].shape[-1]
        if width != their_width:
            raise ConfigError(f"--embedding {item} does not fit the base model {config.pretrained_model_name_or_path}: "
                              f"its vectors are {their_width} wide, the text encoder's {width} "
                              "(SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280); it was trained on another base model")


def _load_token_vectors(pipe, vectors, token: str) -> None:
    """Add ``token`` with its vectors to the pipeline: to both text encoders for SDXL's {"clip_l", "clip_g"}."""
    if isinstance(vectors, dict):
        pipe.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(vectors, token=token)


def _init_image(config, size: tuple[int, int]):
    if not config.init_image:
        return None
    from sdtune.data.images import open_option_image

    return open_option_image(config.init_image, "--init_image").resize(size, Image.Resampling.LANCZOS)
