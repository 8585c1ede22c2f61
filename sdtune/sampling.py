"""Images from a (possibly half-trained) model: validation during training, and `generate`."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
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


@dataclass
class LoadedPipeline:
    """A generation pipeline with what was loaded into it, on its device."""

    pipe: object
    size: tuple[int, int]  # (width, height) of the images asked for
    dtype: torch.dtype
    device: str
    controls: object | None = None  # sdtune.control.Controls with --controlnet


def load_pipeline(config) -> LoadedPipeline:
    """The base (``pretrained_model_name_or_path``) with ``config``'s VAE, scheduler, ControlNets, LoRA and
    embeddings: what `generate` and `eval` sample from. ``config`` is a GenerateConfig or an EvalConfig."""
    from sdtune.errors import ConfigError
    from sdtune.load_adapters import add_embeddings, add_lora
    from sdtune.models import load_components

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
    size = (getattr(config, "width", None) or native, getattr(config, "height", None) or native)
    controls = None
    if getattr(config, "controlnet", None):
        from sdtune.control import load_controls

        controls = load_controls(config, size, dtype, device)
    pipe = components.pipeline(scheduler=make_scheduler(config.scheduler, components.noise_scheduler.config),
                               controlnet=controls.pipeline_model if controls else None)
    pipe.to(device)
    add_lora(pipe, config)
    add_embeddings(pipe, config)
    return LoadedPipeline(pipe, size, dtype, device, controls)


def run_generate(config) -> list[Path]:
    """`sdtune generate`: load, add LoRA/embeddings, sample every prompt, save PNGs (+ grid). Returns the PNG paths."""
    from PIL import PngImagePlugin

    from sdtune.errors import ConfigError

    prompts = _prompts(config)
    loaded = load_pipeline(config)
    pipe, size, controls = loaded.pipe, loaded.size, loaded.controls
    if config.refiner and controls:
        raise ConfigError("--refiner and --controlnet cannot be combined yet; generate with one of them")
    refiner = _load_refiner(pipe, config, loaded.dtype) if config.refiner else None
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
        return read_prompts_file(config.prompts_file, "--prompts_file")
    if not config.prompt:
        raise ConfigError("pass --prompt 'a photo of ...' or --prompts_file FILE")
    return [config.prompt]


def read_prompts_file(path: str | Path, option: str) -> list[str]:
    """The non-empty lines of a prompts file (generate's --prompts_file, eval's --prompts)."""
    from sdtune.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{option} {path} holds no prompt (one per line)")
    return prompts


def _init_image(config, size: tuple[int, int]):
    if not config.init_image:
        return None
    from sdtune.data.images import open_option_image

    return open_option_image(config.init_image, "--init_image").resize(size, Image.Resampling.LANCZOS)
