"""The one training loop, shared by every method (LoRA, DreamBooth, textual inversion).

Trainer.setup() loads the model, lets the method inject what it trains, builds the cached
data and the optimizer; Trainer.train() runs the steps, checkpoints, validates and exports.
The loop never asks which method it runs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdtune import checkpoint as ckpt
from sdtune import diffusion, run_identity
from sdtune.config import TrainConfig, resolve_epochs
from sdtune.data.cache import TextEmbeddingCache
from sdtune.data.class_images import ensure_class_images
from sdtune.data.training_data import build_training_data
from sdtune.data.sources import find_records
from sdtune.errors import ConfigError, ExportFailed, TrainingDiverged
from sdtune.export import follow_umask
from sdtune.host_memory import copy_out_of_mapped_files, release_freed_host_memory, reuse_freed_host_memory
from sdtune.hub import push_to_hub
from sdtune.model_card import write_training_card
from sdtune.methods import Method
from sdtune.models import load_components
from sdtune.optim import build_lr_scheduler, build_optimizer, check_optimizer_available
from sdtune.preflight import check_before_imports
from sdtune.precision import launch_device, resolve_mixed_precision
from sdtune.sampling import sample_images, save_images
from sdtune.threads import set_torch_threads
from sdtune.training_eval import TrainingEvaluator

logger = logging.getLogger(__name__)

CONFIG_FILE = "sdtune_config.yaml"
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    outputs: dict[str, Path]  # format name → file
    global_step: int
    loss_history: list[float] = field(default_factory=list)  # one mean loss per optimizer step
    steps_per_second: float | None = None  # steady-state, excluding setup and caching

    @property
    def final_loss(self) -> float | None:
        return self.loss_history[-1] if self.loss_history else None


def train(config: TrainConfig, method: Method) -> TrainResult:
    """Run ``method`` with ``config`` from start (or the checkpoint it names) to export."""
    trainer = Trainer(config, method)
    on_cpu = launch_device().type == "cpu"
    with reuse_freed_host_memory(config.reuse_host_memory and on_cpu):
        try:
            trainer.setup()
            with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
                return trainer.train()
        finally:
            trainer.cleanup()


class Trainer:
    def __init__(self, config: TrainConfig, method: Method):
        # before any work: options, paths, the Hub, and an --output_dir holding an earlier run's checkpoints
        self._earlier_checkpoints = check_before_imports(config)
        check_optimizer_available(config)
        self.config = config
        self.method = method
        self.output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        config = self.config
        set_torch_threads(config.num_threads)  # chosen, not inherited: one thread per core per process oversubscribes
        # Not through PartialState().device: an accelerate state made before the Accelerator changed
        # what two CPU processes computed (they no longer matched one process with the same batch).
        mixed_precision = resolve_mixed_precision(config.mixed_precision, launch_device())
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / config.logging_dir)),
        )
        if self.accelerator.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            # accelerate runs fp16 on the CPU with neither autocast nor a grad scaler: mixed dtypes crash, gradients underflow
            asked = "--mixed_precision fp16" if config.mixed_precision == "fp16" else \
                "fp16 mixed precision (from accelerate's config: `accelerate launch --config_file` or ACCELERATE_MIXED_PRECISION)"
            raise ConfigError(f"{asked} needs a GPU; on the CPU use --mixed_precision auto "
                              "(bf16 on CPUs with AMX, else no), bf16 or no")
        self.weight_dtype = WEIGHT_DTYPES.get(self.accelerator.mixed_precision, torch.float32)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and (config.checkpointing_steps or config.resume_from_checkpoint):
            # ZeRO partitions the optimizer state; sdtune's checkpoint format holds it whole.
            raise ConfigError("resumable checkpoints are not supported under DeepSpeed yet; pass --checkpointing_steps 0")
        set_seed(config.seed)  # adapter initialisation draws from the global RNGs
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        if self.accelerator.is_main_process:
            run_identity.clear_checkpoints(self._earlier_checkpoints)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / CONFIG_FILE)
        self.accelerator.wait_for_everyone()
        data_dir = config.instance_data_dir or config.train_data_dir
        if config.caption_missing:
            self._caption_missing(data_dir)
        records = find_records(  # before loading the model: a wrong folder should fail in a second, not a minute
            instance_data_dir=data_dir, dataset_name=config.dataset_name,
            dataset_config_name=config.dataset_config_name, image_column=config.image_column,
            caption_column=config.caption_column, caption_extension=config.caption_extension,
        )
        resume = None  # a wrong --resume_from_checkpoint fails here, not after a minute of model loading
        if config.resume_from_checkpoint:
            resume = ckpt.resolve_checkpoint(config.resume_from_checkpoint, self.output_dir)
        if config.max_train_samples is not None and config.max_train_samples < len(records):
            records = random.Random(config.seed).sample(records, config.max_train_samples)  # a seeded subset, as diffusers
        records = self.method.attach_inputs(records)  # e.g. each image's control map
        self._setup_model()
        self._setup_data(records)
        # --num_train_epochs / --validation_epochs become steps now that the epoch's size is known
        resolved = resolve_epochs(config, self.sampler.batches_per_epoch)
        if resolved != config and self.accelerator.is_main_process:
            resolved.save(self.output_dir / CONFIG_FILE)  # the record names the steps (sdtune eval finds the final one)
        self.config = self.method.config = config = resolved
        self._setup_optimizer()
        self.state = ckpt.TrainerState()
        # --eval_steps: its inputs (prompts file, metrics) are checked now, not after the first N steps
        self.evaluator = TrainingEvaluator(config) if config.eval_steps else None
        if config.resume_from_checkpoint:
            self._resume(resume)
        if config.report_to != "none" and self.accelerator.is_main_process:
            self.accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))

    def _caption_missing(self, data_dir: str | None) -> None:
        """Caption the images that have none (shared across processes), then free the captioner before training."""
        from sdtune.captioning import caption_missing_images

        if not data_dir or not Path(data_dir).is_dir():
            raise ConfigError("--caption_missing captions an image folder: pass --instance_data_dir FOLDER")
        output_format = "jsonl" if (Path(data_dir) / "metadata.jsonl").is_file() else "txt"
        caption_missing_images(data_dir, self.config.caption_model, accelerator=self.accelerator, output_format=output_format,
                               caption_extension=self.config.caption_extension)

    def _setup_model(self) -> None:
        config = self.config
        self.components = load_components(
            config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
            single_file_config=config.single_file_config, prediction_type=config.prediction_type,
            allow_pickle=config.allow_pickle, weight_dtype=self.weight_dtype, tokenizer_name=config.tokenizer_name,
            vae_name_or_path=config.pretrained_vae_model_name_or_path,
        )
        device = self.accelerator.device
        for module in (self.components.unet, self.components.vae, *self.components.text_encoders):
            module.to(device)
        if config.with_prior_preservation:  # from the base model, before the method changes anything
            ensure_class_images(
                self.components, self.accelerator, class_data_dir=config.class_data_dir, class_prompt=config.class_prompt,
                num_class_images=config.num_class_images, resolution=config.resolution,
                sample_batch_size=config.sample_batch_size, num_inference_steps=config.class_generation_steps,
                seed=config.seed,
            )
        self.param_groups = self.method.prepare(self.components)
        copy_out_of_mapped_files(p for group in self.param_groups for p in group["params"])
        if config.channels_last:  # convolutions read NHWC; the inputs follow the weights' format
            self.components.unet.to(memory_format=torch.channels_last)
        if config.compile:
            compile_repeated_blocks(self.components.unet)
        if config.gradient_checkpointing:
            self.components.unet.enable_gradient_checkpointing()
            if self.method.trains_text_encoder:
                for text_encoder in self.components.text_encoders:
                    # transformers 5.2x renamed it (the old name warns); 4.x has only the old one
                    getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()

    def _setup_data(self, records) -> None:
        config = self.config
        data = build_training_data(config, records, self.components, self.accelerator,
                                   default_caption=self.method.default_caption, caption_transform=self.method.transform_caption)
        self.sampler, self.dataloader, self.num_samples = data.sampler, data.dataloader, data.num_instance
        self.data_fingerprint = run_identity.data_fingerprint(data.samples)
        self.text_cache = None
        if config.cache_text_embeddings and not self.method.trains_text_encoder:
            self.text_cache = TextEmbeddingCache(self._encode_captions)
            self.text_cache.prefill([s.caption for s in data.samples] + [""] * (config.caption_dropout_rate > 0))
            # Every caption is encoded: the frozen encoders leave the GPU (SDXL's two hold 1.6 GB in fp16)
            # and come back only for validation; a new caption (shuffled tags) is encoded where they are.
            for text_encoder in self.components.text_encoders:
                text_encoder.to(parked_text_encoder_device(self.accelerator.device))
        release_freed_host_memory()  # what caching freed is not the training step's working set

    def _setup_optimizer(self) -> None:
        config, accelerator = self.config, self.accelerator
        if config.scale_lr:
            factor = config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
            for group in self.param_groups:
                group["lr"] *= factor
        optimizer = build_optimizer(config, self.param_groups)
        self.lr_scheduler = build_lr_scheduler(config, optimizer)
        models = self.method.trained_models(self.components)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # accelerate reads the micro batch from a prepared DataLoader; ours is not prepared (see _setup_data)
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        prepared = accelerator.prepare(*models, optimizer)
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]
        # The DDP/autocast wrappers of trained models run the forward pass; frozen models run bare.
        wrapped = {id(model): wrapper for model, wrapper in zip(models, self.models)}
        self.forward_module = lambda module: wrapped.get(id(module), module)
        self.unet = self.forward_module(self.components.unet)
        self.text_encoders = [self.forward_module(module) for module in self.components.text_encoders]
        self.trained_params = [p for group in self.param_groups for p in group["params"]]

    def _resume(self, path: Path | None) -> None:
        if path is None:
            logger.info("no checkpoint in %s yet; starting from step 0", self.output_dir)
            return
        ckpt.check_trained_shapes(path, self.method.state_dict(self.components))
        try:
            self.state, trained = ckpt.load_checkpoint(path, self.optimizer, self.lr_scheduler, self.accelerator.scaler)
        except (ValueError, KeyError) as err:  # e.g. another --optimizer, or parameter groups
            raise ConfigError(f"--resume_from_checkpoint {path}: its optimizer state does not fit this run "
                              f"({' '.join(str(err).split())[:120]}); resume with the settings it was saved with") from None
        run_identity.check_resume(path, ckpt.saved_run(path), self._run_identity(), self.state.global_step,
                                  self.config.max_train_steps)
        self.method.load_state_dict(self.components, trained)
        self._stop_finished_groups()
        logger.info("resumed from %s at step %d", path, self.state.global_step)

    def _run_identity(self) -> dict:
        return run_identity.run_identity(self.config.to_dict(), self.data_fingerprint)

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        accum = config.gradient_accumulation_steps
        self.sampler.start = self.state.global_step * accum  # the exact next batch, mid-epoch included
        batches = iter(self.dataloader)
        progress = tqdm(range(config.max_train_steps), initial=self.state.global_step, desc="Training",
                        disable=not accelerator.is_local_main_process)
        logger.info("training %d samples for %d steps (%d processes x batch %d x %d accumulation)", self.num_samples,
                    config.max_train_steps, accelerator.num_processes, config.train_batch_size, accum)
        pending: list[torch.Tensor] = []  # per-step losses kept on device until the next flush (no sync per step)
        if config.eval_steps and self.state.global_step == 0:
            self.evaluate()  # the reference model's samples: before the first step the model is the base
        first_step, timer = self.state.global_step, None
        while self.state.global_step < config.max_train_steps:
            if timer is None and self.state.global_step == first_step + 1:
                timer = time.perf_counter()  # steady state starts after the first (warm-up) step
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                micro_step = self.state.global_step * accum + micro
                with accelerator.accumulate(*self.models):
                    loss = self.training_step(next(batches), micro_step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.trained_params, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
                step_loss += loss.detach() / accum
            self.lr_scheduler.step()
            self.method.after_step(self.components)
            self.state.global_step += 1
            self._stop_finished_groups()
            pending.append(step_loss)
            progress.update(1)
            step = self.state.global_step
            is_last = step == config.max_train_steps
            checkpoint_due = config.checkpointing_steps and step % config.checkpointing_steps == 0
            if step % _LOG_EVERY == 0 or checkpoint_due or is_last:
                self._flush_losses(pending, progress)
                pending = []
            if checkpoint_due:
                self.save_checkpoint()
            if is_last:
                self._free_optimizer_state()
            if config.validation_prompt and config.num_validation_images and (step % config.validation_steps == 0 or is_last):
                self.validate()
            if config.eval_steps and (step % config.eval_steps == 0 or is_last):
                self.evaluate()
        progress.close()
        steps_per_second = None
        if timer is not None and self.state.global_step - first_step > 1:
            steps_per_second = (self.state.global_step - first_step - 1) / (time.perf_counter() - timer)
        outputs = self.export()
        return TrainResult(self.output_dir, outputs, self.state.global_step, list(self.state.loss_history), steps_per_second)

    def _free_optimizer_state(self) -> None:
        """After the last step (and its checkpoint): Adam's moments, twice the trained weights, are not needed
        to validate or export, and would otherwise set the run's peak memory there."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:  # ZeRO owns its partitions
            self.optimizer.state.clear()
            release_freed_host_memory()

    def _stop_finished_groups(self) -> None:
        """Parameter groups a method stopped (e.g. --stop_text_encoder_training) get lr 0 from now on.

        Through the schedule's base lr, so the scheduler keeps it at 0; with lr 0 AdamW moves
        nothing, not even by weight decay or momentum, whether grads are None or zero.
        """
        for index in self.method.stopped_param_groups(self.state.global_step):
            self.lr_scheduler.base_lrs[index] = 0.0
            self.optimizer.param_groups[index]["lr"] = 0.0

    def training_step(self, batch: dict, micro_step: int) -> torch.Tensor:
        """Loss of one batch. Every random draw comes from (seed, micro_step), drawn for the global batch."""
        config, components, accelerator = self.config, self.components, self.accelerator
        device = accelerator.device
        rows, global_batch = self._global_rows(len(batch["caption"]))
        generator = torch.Generator().manual_seed(_step_seed(config.seed, micro_step))
        torch.manual_seed(_step_seed(config.seed, micro_step) + accelerator.process_index)  # LoRA dropout

        mean, std = self._posterior(batch)  # [B, 4, H/8, W/8]
        shape = (global_batch, *mean.shape[1:])
        eps = torch.randn(shape, generator=generator)[rows].to(device)
        noise = diffusion.sample_noise(shape, generator, config.noise_offset)[rows].to(device)
        num_timesteps = components.noise_scheduler.config.num_train_timesteps
        timesteps = diffusion.sample_timesteps(global_batch, num_timesteps, generator)[rows].to(device)
        latents = (mean.float() + std.float() * eps) * components.vae.config.scaling_factor
        alphas_cumprod = components.alphas_cumprod
        noisy_latents = diffusion.add_noise(latents, noise, timesteps, alphas_cumprod)

        text = self._text_conditioning(batch["caption"], micro_step)
        # the model family's inputs: the text's hidden states, and for SDXL the pooled text and the size numbers
        unet_inputs = components.conditioning.unet_inputs(text, batch["time_ids"], self.weight_dtype)
        noisy_latents = noisy_latents.to(self.weight_dtype)
        # what else the method feeds the UNet (ControlNet: residuals from the control map)
        unet_inputs.update(self.method.extra_unet_inputs(self.forward_module, noisy_latents, timesteps, unet_inputs, batch))
        model_pred = self.unet(noisy_latents, timesteps, **unet_inputs).sample
        target = diffusion.training_target(latents, noise, timesteps, alphas_cumprod, components.prediction_type)
        weights = batch["loss_weight"].to(device)  # 1 for instance images, prior_loss_weight for class images
        if config.snr_gamma is not None:
            weights = weights * diffusion.min_snr_weights(timesteps, alphas_cumprod, config.snr_gamma,
                                                          components.prediction_type)
        return diffusion.diffusion_loss(model_pred, target, weights, num_primary=config.train_batch_size)

    def _global_rows(self, local_size: int) -> tuple[list[int], int]:
        """Which rows of the global batch this process holds, and the global batch size.

        A local batch is B primary samples, then B companions (class images) if any; globally all
        processes' primaries come first, so N processes draw the same noise per sample as one.
        """
        per_part, processes, rank = self.config.train_batch_size, self.accelerator.num_processes, self.accelerator.process_index
        parts = local_size // per_part
        rows = [part * per_part * processes + rank * per_part + i for part in range(parts) for i in range(per_part)]
        return rows, parts * per_part * processes

    def _text_conditioning(self, captions: list[str], micro_step: int) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return self.text_cache(captions)
        step = micro_step // self.config.gradient_accumulation_steps
        if self.method.text_encoder_trains_at(step):
            components = self.components
            return components.conditioning.encode(self.text_encoders, components.tokenizers, captions, self.accelerator.device)
        return self._encode_captions(captions)  # frozen (or no longer trained): the bare modules, outside DDP

    def _posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        if "latent_mean" in batch:
            return batch["latent_mean"].to(device, non_blocking=True), batch["latent_std"].to(device, non_blocking=True)
        vae = self.components.vae  # no cache: the frozen VAE runs on every batch
        with torch.no_grad():
            posterior = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        components = self.components
        device = components.text_encoders[0].device  # parked on the CPU once the captions are cached
        text = components.conditioning.encode(components.text_encoders, components.tokenizers, captions, device)
        return {name: tensor.to(self.accelerator.device) for name, tensor in text.items()}

    # ------------------------------------------------------------------ bookkeeping
    def _flush_losses(self, pending: list[torch.Tensor], progress) -> None:
        """Move pending losses to the host (the only sync point), check them and log them."""
        losses = self.accelerator.reduce(torch.stack(pending), reduction="mean").float().cpu().tolist()
        first = self.state.global_step - len(losses) + 1
        for offset, value in enumerate(losses):
            if not math.isfinite(value):
                kept = ckpt.list_checkpoints(self.output_dir)
                raise TrainingDiverged(
                    f"the loss became {value} at step {first + offset}; lower --learning_rate, try --mixed_precision bf16 "
                    f"or no, and resume from {kept[-1] if kept else 'the start'}"
                )
        self.state.loss_history.extend(losses)
        lr = self.lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        if self.config.report_to != "none":
            for offset, value in enumerate(losses):
                self.accelerator.log({"loss": value, "lr": lr}, step=first + offset)

    def save_checkpoint(self) -> Path | None:
        """Every process reaches here together; only the main process writes."""
        path = None
        if self.accelerator.is_main_process:
            # the method's loadable files too (LoRA files, unet/, embeddings), as diffusers users expect
            path = self._write_checkpoint(lambda folder: self.method.export_checkpoint(self.components, folder))
        self.accelerator.wait_for_everyone()
        return path

    def _write_checkpoint(self, write_outputs=None) -> Path:
        path = ckpt.save_checkpoint(
            self.output_dir, self.state, self.method.state_dict(self.components), self.optimizer, self.lr_scheduler,
            self.accelerator.scaler, total_limit=self.config.checkpoints_total_limit, write_outputs=write_outputs,
            run=self._run_identity(),
        )
        logger.info("saved %s", path)
        return path

    @contextmanager
    def _sampling_mode(self):
        """The models as a pipeline wants them: eval mode (no LoRA dropout in the images), parked text encoders back
        on the device; restored afterwards."""
        modes = {module: module.training for module in (self.components.unet, *self.components.text_encoders)}
        homes = {module: module.device for module in self.components.text_encoders}
        for module in modes:
            module.eval()
        for module in homes:
            module.to(self.accelerator.device)
        try:
            yield
        finally:
            for module, training in modes.items():
                module.train(training)
            for module, home in homes.items():
                module.to(home)

    def validate(self) -> None:
        if self.accelerator.is_main_process:
            config = self.config
            with self._sampling_mode():
                images = sample_images(
                    self.components, config.validation_prompt, num_images=config.num_validation_images, seed=config.seed,
                    resolution=config.resolution, num_inference_steps=config.validation_inference_steps,
                    autocast=self.accelerator.autocast, controls=self.method.validation_controls(self.components),
                )
            save_images(images, self.output_dir / "validation", stem=f"step{self.state.global_step:06d}")
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]),
                                              self.state.global_step, dataformats="NHWC")
        self.accelerator.wait_for_everyone()

    def evaluate(self) -> None:
        """--eval_steps: score the model now as `sdtune eval` does (main process); at step 0, sample the reference."""
        if self.accelerator.is_main_process:
            from sdtune.sampling import make_scheduler

            step = self.state.global_step
            scheduler = make_scheduler(self.evaluator.eval_config.scheduler, self.components.noise_scheduler.config)
            with self._sampling_mode(), self.accelerator.autocast():
                pipe = self.components.pipeline(scheduler=scheduler)
                pipe.set_progress_bar_config(disable=True)
                if step == 0:
                    self.evaluator.set_reference(lambda: pipe)
                else:
                    metrics = self.evaluator.measure(pipe, step)
                    self.accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=step)
        self.accelerator.wait_for_everyone()

    def export(self) -> dict[str, Path]:
        """Every format the method has and the model card (main process), then the upload if asked.

        The upload runs after the last barrier: other processes return instead of waiting on a
        collective, which would time out (NCCL's 10 minutes) during a long upload.
        """
        config = self.config
        outputs: dict[str, Path] = {}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            outputs = self._export_or_keep_weights()
            outputs["config"] = self.output_dir / CONFIG_FILE
            samples = sorted((self.output_dir / "validation").glob(f"step{self.state.global_step:06d}-*.png"))
            outputs["model_card"] = write_training_card(self.output_dir, config, self.method.card_type, samples,
                                                           type(self.components.pipeline()).__name__)
            follow_umask(self.output_dir)  # safetensors writes 0600 files
            logger.info("wrote %s", ", ".join(str(p) for p in outputs.values()))
        self.accelerator.wait_for_everyone()
        if config.push_to_hub and self.accelerator.is_main_process:
            push_to_hub(self.output_dir, config.hub_model_id, private=config.hub_private)
        return outputs

    def _export_or_keep_weights(self) -> dict[str, Path]:
        """The method's exports; if they fail, the trained weights are kept in a checkpoint to export from again."""
        try:
            return self.method.export(self.components, self.output_dir)
        except Exception as err:
            step = self.state.global_step
            kept = ckpt.list_checkpoints(self.output_dir)
            # the weights only (no loadable outputs): writing those may fail the same way the export did
            path = kept[-1] if kept and kept[-1].name == f"checkpoint-{step}" else self._write_checkpoint()
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise ExportFailed(f"training finished ({step} steps) but the export failed ({reason}); the trained weights are "
                               f"in {path}: fix the cause and rerun the same command with --resume_from_checkpoint latest "
                               "to export them without training again") from err

    def cleanup(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()
            # Let the next train() in this Python process (a notebook) choose another mixed precision.
            AcceleratorState._reset_state()


_LOG_EVERY = 10  # steps between host syncs for logging; also flushed at checkpoints and the end


# The UNet's repeated blocks: compiling each class once (not the whole UNet) keeps compile time short,
# and the compiled code is reused by every instance of the block with the same shapes.
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def compile_repeated_blocks(unet: torch.nn.Module) -> int:
    """``torch.compile`` every repeated block of the UNet in place; return how many were compiled.

    Inductor caches what it compiles on disk (``TORCHINDUCTOR_CACHE_DIR``), so a second run with the
    same model and sizes skips most of the compile time.
    """
    blocks = [m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    for block in blocks:
        block.compile()
    return len(blocks)


def parked_text_encoder_device(device: torch.device) -> torch.device:
    """Where frozen text encoders wait once every caption is cached: off the GPU, in host memory."""
    return torch.device("cpu") if device.type in ("cuda", "xpu", "mps") else device


def _step_seed(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step) % (2**63)


def _tracker_config(config: TrainConfig) -> dict:
    """Tracker hparams accept only scalars: None and lists become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
