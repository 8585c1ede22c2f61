"""Caption an image folder with BLIP-2 (or BLIP / InstructBLIP): `sdtune caption` and captioning before training.

Captions go where training reads them: a ``.txt`` beside each image (kohya) or a
``metadata.jsonl`` (HF imagefolder). Images that already have a caption are skipped, so a
killed run resumes; under accelerate each process captions its share of the images.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdtune.caption_store import (
    METADATA, PARTS_DIR, add_prefix_suffix, caption_files, clean_caption, find_images, image_name, jsonl_captioned,
    merge_jsonl_parts, write_captions,
)
from sdtune.command_configs import DEFAULT_CAPTION_MODEL as DEFAULT_MODEL
from sdtune.command_configs import CaptionConfig
from sdtune.options import build_config
from sdtune.data.images import IMAGE_EXTENSIONS, BadImage, open_rgb
from sdtune.errors import ConfigError, DataError, ModelLoadError

logger = logging.getLogger(__name__)

# model_type in the model's config.json → (model class, processor class) in transformers
FAMILIES = {
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "blip": ("BlipForConditionalGeneration", "BlipProcessor"),
    "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
}
DEFAULT_INSTRUCTION = "A short image caption:"  # InstructBLIP needs an instruction; this is LAVIS's captioning prompt


@dataclass
class CaptionSummary:
    """What a captioning run did, over all processes."""

    captioned: int = 0
    skipped: int = 0  # images that already had a caption
    failed: int = 0
    failed_files: list[str] = field(default_factory=list)  # relative to data_dir


@dataclass
class Captioner:
    """A loaded captioning model and its processor."""

    model: Any
    processor: Any
    family: str  # a key of FAMILIES
    config: CaptionConfig
    device: torch.device
    dtype: torch.dtype

    @property
    def prompt(self) -> str | None:
        if self.family == "instructblip":
            return self.config.prompt or DEFAULT_INSTRUCTION
        return self.config.prompt or None

    def inputs(self, images: list) -> Any:
        """The model inputs for a batch of PIL images (``pixel_values``, and ``input_ids`` with image tokens for BLIP-2)."""
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.family != "blip" or self.prompt:
            # BLIP-2: always through the processor, which puts the num_query_tokens image tokens load_captioner checked
            kwargs["text"] = [self.prompt or ""] * len(images)
        batch = self.processor(**kwargs).to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    @torch.no_grad()
    def generate(self, images: list) -> list[str]:
        """Raw decoded captions, one per image, before cleanup."""
        batch = self.inputs(images)
        generate_kwargs = dict(max_new_tokens=self.config.max_new_tokens, num_beams=self.config.num_beams, do_sample=False)
        if self.config.min_length:
            generate_kwargs["min_new_tokens"] = self.config.min_length
        output = self.model.generate(**batch, **generate_kwargs)  # [B, L]
        prompt_ids = batch.get("input_ids")  # [B, P]
        if prompt_ids is not None and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids):
            output = output[:, prompt_ids.shape[1]:]  # decoder-only LMs return image tokens + prompt before the caption
        return self.processor.batch_decode(output, skip_special_tokens=True)

    def caption(self, images: list) -> list[str]:
        """Finished captions: cleaned, with prefix and suffix (empty where the model produced nothing usable)."""
        texts = [clean_caption(text, self.prompt) for text in self.generate(images)]
        return [add_prefix_suffix(text, self.config.prefix, self.config.suffix) if text else "" for text in texts]


def model_family(model: str) -> str:
    """The captioner family ("blip-2", "blip" or "instructblip") from the model's config.json.

    Raises:
        ModelLoadError: the config cannot be read, or the model is of another type.
    """
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"captioning model {model}: could not read its config ({_first_line(err)}); "
                             "pass a Hub id or a folder saved with save_pretrained") from None
    if model_type not in FAMILIES:
        raise ModelLoadError(f"captioning model {model} is a '{model_type}' model; supported types: {', '.join(FAMILIES)}")
    return model_type


def load_captioner(config: CaptionConfig, device: torch.device | str | None = None) -> Captioner:
    """Load the model and processor, check the BLIP-2 image-token setup, and move the model to ``device``.

    Raises:
        ConfigError: 8/4-bit loading without CUDA or without bitsandbytes.
        ModelLoadError: the model cannot be loaded, or its image-token setup is inconsistent.
    """
    import transformers

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # fp16/bf16 generation on a CPU is many times slower than fp32
    dtype = torch.float32 if device.type != "cuda" else {"no": torch.float32, "bf16": torch.bfloat16}.get(
        config.mixed_precision or "fp16", torch.float16)
    quantization = _quantization_config(config, dtype)
    family = model_family(config.model)
    model_cls, processor_cls = (getattr(transformers, name) for name in FAMILIES[family])
    kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=None if config.allow_pickle else True)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    try:
        model = model_cls.from_pretrained(config.model, **kwargs)
        processor = processor_cls.from_pretrained(config.model)
    except (OSError, ValueError) as err:
        pickle = "safetensors" in str(err) and not config.allow_pickle
        hint = "; pass --allow_pickle for .bin weights you trust" if pickle else ""
        raise ModelLoadError(f"captioning model {config.model}: could not load ({_first_line(err)}){hint}") from None
    if quantization is None:
        model.to(device)
    model.eval()
    if family != "blip":
        check_image_tokens(model, processor, config.model)
    return Captioner(model=model, processor=processor, family=family, config=config, device=device, dtype=dtype)


def check_image_tokens(model: Any, processor: Any, name: str = "model") -> None:
    """Make BLIP-2 / InstructBLIP image tokens consistent between model and processor, in place.

    ``generate`` puts the image features where ``input_ids == config.image_token_index``, and the
    processor writes ``num_query_tokens`` such tokens. Unset values (old Hub snapshots) are
    taken from the other side; contradicting values are an error.

    Raises:
        ModelLoadError: the two sides disagree.
    """
    config, tokenizer = model.config, processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    token = getattr(image_token, "content", str(image_token))
    token_id = tokenizer.convert_tokens_to_ids(token)
    if config.image_token_index is None:  # unset: generate() builds [None] * num_query_tokens and crashes
        logger.info("%s: setting image_token_index to the id of %s (%d)", name, token, token_id)
        config.image_token_index = token_id
    elif config.image_token_index != token_id:
        raise ModelLoadError(f"captioning model {name}: config.image_token_index is {config.image_token_index} but the "
                             f"tokenizer's {token} is {token_id}; use the processor saved with this model")
    if token_id >= model.get_input_embeddings().num_embeddings:
        # the processor added the token; its embedding row is always overwritten by image features
        model.resize_token_embeddings(len(tokenizer))
    if processor.num_query_tokens is None:  # unset: the prompt gets no image tokens and the image is ignored
        processor.num_query_tokens = config.num_query_tokens
    elif processor.num_query_tokens != config.num_query_tokens:
        raise ModelLoadError(f"captioning model {name}: the processor's num_query_tokens ({processor.num_query_tokens}) is "
                             f"not the model's ({config.num_query_tokens}); fix processor_config.json or use the matching processor")


def caption_images(config: CaptionConfig, accelerator: Any = None) -> CaptionSummary:
    """Caption the images of ``config.data_dir`` that have no caption (all of them with ``overwrite``).

    Under accelerate (``accelerator`` with several processes) process i captions items i::N of
    the pending images; all processes return the same summary.

    Raises:
        DataError: the folder does not exist, has no images, or its metadata.jsonl is broken.
        ConfigError, ModelLoadError: see `load_captioner`.
    """
    folder = Path(config.data_dir)
    if not folder.is_dir():
        raise DataError(f"--data_dir {folder}: no such folder")
    _quantization_config(config, torch.float16)  # fail before listing and loading anything
    if accelerator is not None and config.mixed_precision is None and accelerator.mixed_precision in ("no", "fp16", "bf16"):
        config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    images = find_images(folder)
    if not images:
        raise DataError(f"--data_dir {folder}: no images ({' '.join(IMAGE_EXTENSIONS)})")
    if config.output_format == "txt" and (folder / METADATA).is_file() and rank == 0:
        logger.warning("%s has a %s, which training reads instead of caption files; consider --output_format jsonl",
                       folder, METADATA)
    files = {} if config.overwrite else caption_files(folder, images, config.caption_extension)
    listed = set() if config.overwrite else jsonl_captioned(folder)
    done = files.keys() | listed
    pending = [path for path in images if image_name(folder, path) not in done]
    _wait(accelerator)  # every process has listed the pending images before any caption is written
    if config.output_format == "jsonl" and rank == 0:
        # training reads only metadata.jsonl once it exists: carry captions from caption files into it
        carried = [(folder / name, text) for name, text in files.items() if name not in listed]
        write_captions(folder, carried, output_format="jsonl", part=rank)
    started = time.perf_counter()
    captioned, failed = _caption_shard(config, folder, pending[rank::world], rank, accelerator)
    if world > 1:
        captioned, failed = _share_results(folder, accelerator, captioned, failed)  # waits for every process
    if rank == 0:
        merge_jsonl_parts(folder)
    _wait(accelerator)  # metadata.jsonl is complete for every process from here on
    summary = CaptionSummary(captioned, skipped=len(images) - len(pending), failed=len(failed), failed_files=failed)
    if rank == 0:
        seconds = time.perf_counter() - started
        failures = f" ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})" if failed else ""
        logger.info("captioned %d images in %.1f s (%.2f images/s), skipped %d that had captions, %d failed%s",
                    captioned, seconds, captioned / max(seconds, 1e-9), summary.skipped, summary.failed, failures)
    # Failure only when the folder ends with no caption at all: a rerun that finds every good image captioned
    # and one unreadable image (a logged skip) has done all there was to do.
    if pending and not captioned and not summary.skipped:  # every process has the same counts: all of them raise
        raise DataError(f"no image of {folder} was captioned: all {len(failed)} failed (unreadable or empty captions, "
                        f"e.g. {', '.join(failed[:3])}); check the images and --model")
    return summary


def caption_missing_images(data_dir: str, model: str = DEFAULT_MODEL, *, accelerator: Any = None,
                           **options: Any) -> CaptionSummary:
    """Caption only the images of ``data_dir`` without a caption, then free the model's memory (for training).

    Args:
        data_dir: The training image folder.
        model: Captioning model (Hub id or folder).
        accelerator: The training run's accelerator, to share the work across its processes.
        **options: Other `CaptionConfig` fields (``prompt``, ``prefix``, ``output_format``, ...).
    """
    config = build_config(CaptionConfig, {**options, "data_dir": data_dir, "model": model, "overwrite": False},
                          source="captioning option")
    try:
        return caption_images(config, accelerator)
    finally:
        release_memory()


def _caption_shard(config: CaptionConfig, folder: Path, paths: list[Path], rank: int, accelerator: Any
                   ) -> tuple[int, list[str]]:
    """Caption ``paths`` on this process; returns (number captioned, names that failed)."""
    if not paths:
        return 0, []
    captioner = load_captioner(config, accelerator.device if accelerator is not None else None)
    captioned, failed = 0, []
    try:
        with tqdm(total=len(paths), desc="captioning", unit="img", disable=rank != 0, dynamic_ncols=True) as bar:
            for start in range(0, len(paths), config.batch_size):
                batch, images = paths[start:start + config.batch_size], []
                for path in batch:
                    try:
                        images.append((path, open_rgb(path.read_bytes(), str(path))))
                    except (BadImage, OSError) as err:
                        logger.warning("%s: %s; not captioned", path, err)
                        failed.append(image_name(folder, path))
                try:
                    captions = captioner.caption([image for _, image in images]) if images else []
                except torch.cuda.OutOfMemoryError:
                    raise ConfigError(f"out of GPU memory captioning {len(images)} images at once; pass a smaller "
                                      f"--batch_size (now {config.batch_size}) or --load_in_8bit") from None
                written = []
                for (path, _), caption in zip(images, captions):
                    if caption:
                        written.append((path, caption))
                    else:
                        logger.warning("%s: the model returned an empty caption; not captioned", path)
                        failed.append(image_name(folder, path))
                write_captions(folder, written, output_format=config.output_format,
                               caption_extension=config.caption_extension, part=rank)
                captioned += len(written)
                bar.update(len(batch))
    finally:
        del captioner
        release_memory()
    return captioned, failed


def release_memory() -> None:
    """Return freed model memory (CUDA cache included) after the captioner is dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _share_results(folder: Path, accelerator: Any, captioned: int, failed: list[str]) -> tuple[int, list[str]]:
    # Through small files rather than accelerate's gather_object: gloo's worker thread frees the
    # gathered tensor late and can abort the interpreter at exit ("terminate called without an active exception").
    rank, world = accelerator.process_index, accelerator.num_processes
    results = folder / PARTS_DIR
    results.mkdir(exist_ok=True)
    (results / f"result-{rank}.json").write_text(json.dumps([captioned, failed]))
    accelerator.wait_for_everyone()  # every shard is written and reported
    shared = [json.loads((results / f"result-{i}.json").read_text()) for i in range(world)]
    accelerator.wait_for_everyone()  # everyone has read the results before they are deleted
    if rank == 0:
        for i in range(world):
            (results / f"result-{i}.json").unlink()
    return sum(r[0] for r in shared), sorted(name for r in shared for name in r[1])


def _quantization_config(config: CaptionConfig, dtype: torch.dtype) -> Any:
    if not (config.load_in_8bit or config.load_in_4bit):
        return None
    flag = "--load_in_8bit" if config.load_in_8bit else "--load_in_4bit"
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag} needs a CUDA GPU (bitsandbytes); drop it to caption in full precision on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag} needs bitsandbytes; install it with pip install 'sdtune[bnb]'")
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


def _wait(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
