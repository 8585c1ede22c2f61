#!/usr/bin/env python
"""Check that sdtune's single-file ControlNet export loads in ComfyUI (and A1111's sd-webui-controlnet).

What it does, per architecture (SD 1.5; SDXL with --sdxl):

1. Builds a randomly initialised diffusers ``ControlNetModel`` of the real architecture, offline.
   Every parameter that comes out of the constructor as a constant tensor (the zero convolutions,
   the norms' ones and zeros) is given random values, so a wrong mapping cannot hide behind
   identical tensors.
2. Writes it three ways: sdtune's ``save_controlnet_single_file`` in fp32 and in fp16, and the
   diffusers ``save_pretrained`` folder (``diffusion_pytorch_model.safetensors``, fp32).
3. Loads every file with ComfyUI's own loader, ``comfy.controlnet.load_controlnet``, on the CPU,
   and records: the model family ComfyUI's detection picks, the missing/unexpected keys of its
   ``load_state_dict(strict=False)`` call, the warnings it logs, whether the loaded tensors equal
   the ones ComfyUI gets from the diffusers-format file (ComfyUI's own name mapping, independent
   of sdtune's), a few hand-picked tensors by name, and the max abs difference between the
   residuals of ComfyUI's ControlNet and of the diffusers model on the same random inputs.
4. With --a1111 (an sd-webui-controlnet tree) and --ldm (a tree holding Stability's ``ldm``
   package, as A1111 ships in repositories/stable-diffusion-stability-ai), does the same through
   the extension's ``build_model_by_guess``, with two tiny stand-ins for A1111's ``modules.devices``
   and ``modules.shared``.

Usage:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/path/to/sdtune \\
        python check_controlnet_loaders.py --comfyui ComfyUI --work out \\
        [--a1111 sd-webui-controlnet --ldm stablediffusion [--sgm generative-models]] [--sdxl] [--no-sd15]

Exit status 0 when every load and comparison passed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import sys
import time
import types
from pathlib import Path

import torch

# Tolerances for the output comparison, relative to the largest reference residual.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2  # fp16 weights, fp32 compute: the weight rounding is compared against a rounded reference

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

SDXL_CONTROLNET = dict(
    in_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)

# diffusers name -> original (cldm) name, written out by hand from the two architectures'
# definitions, for a few spot checks that do not go through any converter.
SPOT_CHECKS_COMMON = {
    "conv_in.weight": "input_blocks.0.0.weight",
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "controlnet_cond_embedding.conv_in.weight": "input_hint_block.0.weight",
    "controlnet_cond_embedding.blocks.0.weight": "input_hint_block.2.weight",
    "controlnet_cond_embedding.blocks.5.bias": "input_hint_block.12.bias",
    "controlnet_cond_embedding.conv_out.weight": "input_hint_block.14.weight",
    "controlnet_down_blocks.0.weight": "zero_convs.0.0.weight",
    "controlnet_down_blocks.4.bias": "zero_convs.4.0.bias",
    "controlnet_mid_block.weight": "middle_block_out.0.weight",
    "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
    "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
    "down_blocks.0.resnets.1.time_emb_proj.weight": "input_blocks.2.0.emb_layers.1.weight",
    "down_blocks.0.resnets.1.norm2.bias": "input_blocks.2.0.out_layers.0.bias",
    "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
    "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
    "mid_block.resnets.0.conv2.weight": "middle_block.0.out_layers.3.weight",
    "mid_block.resnets.1.time_emb_proj.bias": "middle_block.2.emb_layers.1.bias",
}
SPOT_CHECKS = {
    "sd15": {
        **SPOT_CHECKS_COMMON,
        "controlnet_down_blocks.11.weight": "zero_convs.11.0.weight",
        "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0.weight":
            "input_blocks.8.1.transformer_blocks.0.attn1.to_out.0.weight",
        "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight":
            "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.2.attentions.1.transformer_blocks.0.norm3.weight":
            "input_blocks.8.1.transformer_blocks.0.norm3.weight",
        "down_blocks.3.resnets.1.conv2.weight": "input_blocks.11.0.out_layers.3.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight":
            "middle_block.1.transformer_blocks.0.attn2.to_v.weight",
        "mid_block.attentions.0.norm.weight": "middle_block.1.norm.weight",
    },
    "sdxl": {
        **SPOT_CHECKS_COMMON,
        "controlnet_down_blocks.8.weight": "zero_convs.8.0.weight",
        "add_embedding.linear_1.weight": "label_emb.0.0.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
        "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.4.1.proj_in.weight",
        "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight":
            "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
        "down_blocks.2.attentions.1.transformer_blocks.9.norm3.weight":
            "input_blocks.8.1.transformer_blocks.9.norm3.weight",
        "mid_block.attentions.0.transformer_blocks.9.attn1.to_q.weight":
            "middle_block.1.transformer_blocks.9.attn1.to_q.weight",
    },
}


# --------------------------------------------------------------------------------------------
# Small helpers


class LogCapture(logging.Handler):
    """Keeps every record logged at or above a level while installed on the root logger."""

    def __init__(self, level=logging.DEBUG):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, min_level=logging.WARNING):
        return [f"{r.levelname}: {r.getMessage()}" for r in self.records if r.levelno >= min_level]


@contextlib.contextmanager
def captured_logs(logger_names=("",)):
    handler = LogCapture()
    loggers = [logging.getLogger(name) for name in logger_names]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


@contextlib.contextmanager
def recorded_state_dict_loads():
    """Records the (missing, unexpected) result of every ``nn.Module.load_state_dict`` call.

    Both loaders call ``load_state_dict(..., strict=False)``; A1111 throws the result away, ComfyUI
    logs the unexpected keys at debug level only, so the calls are watched here instead.
    """
    calls = []
    original = torch.nn.Module.load_state_dict

    def recording(module, state_dict, *args, **kwargs):
        result = original(module, state_dict, *args, **kwargs)
        calls.append((type(module).__name__, list(result.missing_keys), list(result.unexpected_keys)))
        return result

    torch.nn.Module.load_state_dict = recording
    try:
        yield calls
    finally:
        torch.nn.Module.load_state_dict = original


def randomise_constant_parameters(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Give every constant parameter (zero convolutions, norm weights/biases) random values."""
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                noise = torch.randn(p.shape, generator=generator) * 0.05
                p.copy_(p + noise.to(p.dtype))
                changed += 1
    return changed


def round_weights_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round ``model``'s weights to ``dtype`` and back, in place (the fp16 file's reference model)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return model


def max_abs_difference(outputs, references) -> tuple[float, float]:
    """Max abs difference over residual lists, and the largest abs reference value."""
    assert len(outputs) == len(references), (len(outputs), len(references))
    diff, scale = 0.0, 0.0
    for out, ref in zip(outputs, references):
        assert out.shape == ref.shape, (out.shape, ref.shape)
        diff = max(diff, (out.float() - ref.float()).abs().max().item())
        scale = max(scale, ref.float().abs().max().item())
    return diff, scale


def fingerprint(tensor: torch.Tensor, dtype: torch.dtype) -> str:
    """A digest of the tensor's values after rounding to ``dtype``, shape-free (a 1x1 conv may be stored as a linear)."""
    values = tensor.detach().to(dtype).float().contiguous().flatten()
    return hashlib.sha1(values.numpy().tobytes()).hexdigest()


def fingerprints(state_dict: dict, dtype: torch.dtype) -> dict[str, str]:
    return {k: fingerprint(v, dtype) for k, v in state_dict.items() if v.is_floating_point()}


def compare_fingerprints(loaded: dict, expected: dict) -> str:
    """Common keys, keys present in only one of them, and the common keys whose values differ."""
    common = sorted(set(loaded) & set(expected))
    differ = [k for k in common if loaded[k] != expected[k]]
    only_loaded = sorted(set(loaded) - set(expected))
    only_expected = sorted(set(expected) - set(loaded))
    text = f"{len(common)} common keys, {len(common) - len(differ)} bit-equal"
    if differ:
        text += f", DIFFERENT: {short(differ)}"
    if only_loaded:
        text += f", ONLY HERE: {short(only_loaded)}"
    if only_expected:
        text += f", MISSING HERE: {short(only_expected)}"
    return text


def short(keys, n=6) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    head = ", ".join(keys[:n])
    return f"{len(keys)}: {head}{', ...' if len(keys) > n else ''}"


# --------------------------------------------------------------------------------------------
# The reference model and its files


def build_controlnet(arch: str, seed: int):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    if arch == "sd15":
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel.from_unet(unet)
        del unet
    else:  # the SDXL base UNet's encoder half, built directly: the full UNet would need ~10 GB more
        controlnet = ControlNetModel(**SDXL_CONTROLNET)
    changed = randomise_constant_parameters(controlnet, torch.Generator().manual_seed(seed + 1))
    controlnet.eval().requires_grad_(False)
    return controlnet, changed


def make_inputs(arch: str, seed: int, latent: int):
    g = torch.Generator().manual_seed(seed + 2)
    context_dim = 768 if arch == "sd15" else 2048
    inputs = {
        "x": torch.randn(1, 4, latent, latent, generator=g),
        "t": torch.tensor([421.0]),
        "context": torch.randn(1, 77, context_dim, generator=g),
        "hint": torch.rand(1, 3, latent * 8, latent * 8, generator=g),
    }
    if arch == "sdxl":
        inputs["text_embeds"] = torch.randn(1, 1280, generator=g)
        inputs["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    return inputs


def sdxl_vector_input(controlnet, inputs) -> torch.Tensor:
    """The original models' ``y``: pooled text embedding + sinusoidal embeddings of the size/crop ids."""
    time_embeds = controlnet.add_time_proj(inputs["time_ids"].flatten()).reshape(1, -1)
    return torch.cat([inputs["text_embeds"], time_embeds.to(inputs["text_embeds"].dtype)], dim=-1)


def diffusers_residuals(controlnet, inputs) -> list[torch.Tensor]:
    extra = {}
    if "text_embeds" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        down, mid = controlnet(inputs["x"], inputs["t"], inputs["context"], inputs["hint"],
                               return_dict=False, **extra)
    return [*down, mid]


def write_files(controlnet, work: Path, arch: str) -> dict[str, Path]:
    from sdtune.single_file import save_controlnet_single_file

    files = {
        "sdtune fp32": save_controlnet_single_file(work / f"{arch}_controlnet_fp32.safetensors", controlnet,
                                                   dtype=torch.float32),
        "sdtune fp16": save_controlnet_single_file(work / f"{arch}_controlnet_fp16.safetensors", controlnet,
                                                   dtype=torch.float16),
    }
    folder = work / f"{arch}_controlnet_diffusers"
    controlnet.save_pretrained(folder, safe_serialization=True)
    files["diffusers folder"] = folder / "diffusion_pytorch_model.safetensors"
    return files


# --------------------------------------------------------------------------------------------
# ComfyUI


def import_comfyui(root: Path):
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read by comfy.model_management when it is first imported
    import comfy.controlnet
    import comfy.model_detection
    import comfy.utils

    return comfy


def comfyui_detected_family(comfy, path: Path) -> str:
    """The model class ComfyUI's detection matches the file's UNet-half configuration to."""
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        config = comfy.model_detection.unet_config_from_diffusers_unet(sd)
        model_config = comfy.model_detection.model_config_from_unet_config(config) if config else None
    else:
        prefix = "control_model." if "control_model.zero_convs.0.0.weight" in sd else ""
        model_config = comfy.model_detection.model_config_from_unet(sd, prefix, False)
    return type(model_config).__name__ if model_config is not None else "not detected"


def load_with_comfyui(comfy, path: Path):
    with captured_logs() as logs, recorded_state_dict_loads() as loads:
        control = comfy.controlnet.load_controlnet(str(path))
    if control is None:
        raise RuntimeError(f"ComfyUI returned no ControlNet for {path}: {logs.messages()}")
    model = control.control_model
    calls = [c for c in loads if c[0] in ("ControlNet", "WeightsLoader")]
    if not calls:
        raise RuntimeError("ComfyUI's load_state_dict call on the ControlNet was not seen")
    missing = [k for c in calls for k in c[1]]
    unexpected = [k for c in calls for k in c[2]]
    return model, missing, unexpected, logs.messages()


def comfyui_residuals(model, inputs, y=None) -> list[torch.Tensor]:
    dtype = next(model.parameters()).dtype
    kwargs = {} if y is None else {"y": y.to(dtype)}
    with torch.no_grad():
        out = model(x=inputs["x"].to(dtype), hint=inputs["hint"].to(dtype), timesteps=inputs["t"].to(dtype),
                    context=inputs["context"].to(dtype), **kwargs)
    return [*out["output"], *out["middle"]]


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111 sd-webui-controlnet


def import_a1111(extension: Path, ldm_root: Path, sgm_root: Path | None = None):
    """Imports the extension's model guesser with stand-ins for the two webui modules it touches.

    The extension builds its ControlNet from ``sgm`` (Stability's generative-models, which A1111
    ships for SDXL) when importable, else from ``ldm``; ldm's SpatialTransformer cannot build SDXL's
    multi-layer transformers. ``sgm``'s package ``__init__`` files pull in its whole training stack
    (lightning, open_clip, ...), so the two packages are registered bare, their submodules imported
    from the real files.
    """
    modules = types.ModuleType("modules")
    modules.__path__ = []
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.cpu = torch.device("cpu")
    devices.dtype = devices.dtype_unet = devices.dtype_vae = torch.float32
    devices.get_device_for = lambda task: torch.device("cpu")
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(controlnet_loglevel="INFO")
    shared.opts = types.SimpleNamespace()
    modules.devices, modules.shared = devices, shared
    sys.modules.update({"modules": modules, "modules.devices": devices, "modules.shared": shared})
    if sgm_root is not None:
        for package in ("sgm", "sgm.modules"):
            module = types.ModuleType(package)
            module.__path__ = [str(sgm_root.joinpath(*package.split(".")))]
            sys.modules[package] = module
    sys.path.insert(0, str(ldm_root))
    sys.path.insert(0, str(extension))
    from scripts import controlnet_model_guess

    return controlnet_model_guess


def a1111_backend() -> str:
    from scripts import cldm

    return "sgm" if cldm.using_sgm else "ldm"


def load_with_a1111(guess, path: Path):
    from safetensors.torch import load_file

    state_dict = load_file(str(path))
    with captured_logs(("", "ControlNet")) as logs, recorded_state_dict_loads() as loads:
        result = guess.build_model_by_guess(state_dict, None, str(path))
    model = result.model.control_model
    calls = [c for c in loads if c[0] == "ControlNet"]
    if not calls:
        raise RuntimeError("A1111's load_state_dict call on the ControlNet was not seen")
    missing = [k for c in calls for k in c[1]]
    unexpected = [k for c in calls for k in c[2]]
    info = [r.getMessage() for r in logs.records if r.name == "ControlNet"]
    return model, str(result.type), info, missing, unexpected, logs.messages()


def a1111_residuals(model, inputs, y=None) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(inputs["x"], inputs["hint"], inputs["t"], inputs["context"], y=y)


# --------------------------------------------------------------------------------------------


def check_architecture(arch: str, args, comfy, a1111_guess, rows: list[dict]) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    controlnet, changed = build_controlnet(arch, args.seed)
    print(f"[{arch}] built diffusers ControlNetModel ({sum(p.numel() for p in controlnet.parameters()) / 1e6:.0f}M "
          f"parameters, {changed} constant tensors randomised) in {time.time() - t0:.0f}s", flush=True)
    files = write_files(controlnet, work, arch)
    for name, path in files.items():
        print(f"[{arch}] wrote {name}: {path} ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)

    inputs = make_inputs(arch, args.seed, args.latent)
    y = sdxl_vector_input(controlnet, inputs) if arch == "sdxl" else None
    reference = diffusers_residuals(controlnet, inputs)
    spot_tensors = {k: v.clone() for k, v in controlnet.state_dict().items() if k in SPOT_CHECKS[arch]}
    reference16 = diffusers_residuals(round_weights_(controlnet, torch.float16), inputs)
    del controlnet
    gc.collect()

    def spot_check(loaded_sd, weights_dtype) -> str:
        bad = []
        for src, dst in SPOT_CHECKS[arch].items():
            expected = spot_tensors[src].to(weights_dtype).float()
            got = loaded_sd.get(dst)
            if got is None or got.numel() != expected.numel() or not torch.equal(got.float().reshape(expected.shape), expected):
                bad.append(dst)
        return f"{len(SPOT_CHECKS[arch]) - len(bad)}/{len(SPOT_CHECKS[arch])} equal" + (f" (wrong: {bad})" if bad else "")

    comfy_reference = None  # fingerprints of ComfyUI's load of the diffusers-format file, by weight dtype
    if comfy is not None:
        # The diffusers-format file first: ComfyUI's own conversion is the yardstick for the others.
        order = ["diffusers folder", "sdtune fp32", "sdtune fp16"]
        for name in order:
            path = files[name]
            weights_dtype = torch.float16 if "fp16" in name else torch.float32
            family = comfyui_detected_family(comfy, path)
            model, missing, unexpected, warnings = load_with_comfyui(comfy, path)
            loaded_sd = model.state_dict()
            if name == "diffusers folder":
                comfy_reference = {dt: fingerprints(loaded_sd, dt) for dt in (torch.float32, torch.float16)}
                vs_reference = "(is the reference)"
            else:
                vs_reference = compare_fingerprints(fingerprints(loaded_sd, weights_dtype), comfy_reference[weights_dtype])
            t1 = time.time()
            out = comfyui_residuals(model, inputs, y)
            ref = reference16 if weights_dtype == torch.float16 else reference
            diff, scale = max_abs_difference(out, ref)
            tolerance = FP16_TOLERANCE if weights_dtype == torch.float16 else FP32_TOLERANCE
            rows.append(dict(
                arch=arch, loader="ComfyUI", file=name, detected=family,
                model_dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                missing=missing, unexpected=unexpected, warnings=warnings,
                vs_reference=vs_reference, spot=spot_check(loaded_sd, weights_dtype),
                outputs=len(out), diff=diff, scale=scale,
                ok=(not missing and not unexpected and diff <= tolerance * scale
                    and not any(w in vs_reference for w in ("DIFFERENT", "ONLY", "MISSING"))),
            ))
            print(f"[{arch}] ComfyUI / {name}: forward {time.time() - t1:.0f}s, max |diff| {diff:.3g} "
                  f"(largest residual {scale:.3g})", flush=True)
            del model, loaded_sd
            gc.collect()

    if a1111_guess is not None:
        for name in ["sdtune fp32", "sdtune fp16", "diffusers folder"]:
            path = files[name]
            weights_dtype = torch.float16 if "fp16" in name else torch.float32
            try:
                model, kind, info, missing, unexpected, warnings = load_with_a1111(a1111_guess, path)
            except Exception as error:  # noqa: BLE001 - reported in the table
                rows.append(dict(arch=arch, loader="A1111", file=name, detected=f"FAILED: {error!r}"[:200],
                                 model_dtype="-", missing=[], unexpected=[], warnings=[], vs_reference="-",
                                 spot="-", outputs=0, diff=float("nan"), scale=float("nan"), ok=False))
                continue
            loaded_sd = model.state_dict()
            if comfy_reference is not None:
                vs_reference = compare_fingerprints(fingerprints(loaded_sd, weights_dtype), comfy_reference[weights_dtype])
            else:
                vs_reference = "-"
            t1 = time.time()
            out = a1111_residuals(model, inputs, y)
            ref = reference16 if weights_dtype == torch.float16 else reference
            diff, scale = max_abs_difference(out, ref)
            tolerance = FP16_TOLERANCE if weights_dtype == torch.float16 else FP32_TOLERANCE
            rows.append(dict(
                arch=arch, loader="A1111", file=name, detected=f"{kind}; {'; '.join(info)}; {a1111_backend()}",
                model_dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                missing=missing, unexpected=unexpected, warnings=warnings, vs_reference=vs_reference,
                spot=spot_check(loaded_sd, weights_dtype), outputs=len(out), diff=diff, scale=scale,
                ok=(not missing and not unexpected and diff <= tolerance * scale
                    and not any(w in vs_reference for w in ("DIFFERENT", "ONLY", "MISSING"))),
            ))
            print(f"[{arch}] A1111 / {name}: forward {time.time() - t1:.0f}s, max |diff| {diff:.3g}", flush=True)
            del model, loaded_sd
            gc.collect()


def print_table(rows: list[dict]) -> None:
    print("\n" + "=" * 100)
    header = f"{'arch':5} {'loader':8} {'file':17} {'detected as':34} {'dtype':8} {'miss':>4} {'unexp':>5} " \
             f"{'outs':>4} {'max|diff|':>10} {'max|ref|':>9}  result"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['arch']:5} {r['loader']:8} {r['file']:17} {r['detected'][:34]:34} {r['model_dtype']:8} "
              f"{len(r['missing']):>4} {len(r['unexpected']):>5} {r['outputs']:>4} {r['diff']:>10.3g} "
              f"{r['scale']:>9.3g}  {'OK' if r['ok'] else 'FAIL'}")
    print("=" * 100)
    for r in rows:
        print(f"\n{r['arch']} / {r['loader']} / {r['file']}:")
        print(f"  detected:            {r['detected']}")
        print(f"  missing keys:        {short(r['missing'])}")
        print(f"  unexpected keys:     {short(r['unexpected'])}")
        print(f"  vs ComfyUI load of diffusers file:    {r['vs_reference']}")
        print(f"  spot checks by name: {r['spot']}")
        if r["warnings"]:
            for w in r["warnings"][:8]:
                print(f"  log: {w[:300]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="an extracted ComfyUI tree")
    parser.add_argument("--a1111", type=Path, help="an extracted sd-webui-controlnet tree (optional)")
    parser.add_argument("--ldm", type=Path, help="a tree holding Stability's ldm package (needed with --a1111)")
    parser.add_argument("--sgm", type=Path, help="a tree holding Stability's sgm package (generative-models); "
                        "A1111's SDXL ControlNet needs it")
    parser.add_argument("--work", type=Path, required=True, help="folder for the written files")
    parser.add_argument("--sdxl", action="store_true", help="also check the SDXL architecture (~5 GB fp32 per copy)")
    parser.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5 architecture")
    parser.add_argument("--latent", type=int, default=64, help="latent side of the test input (hint is 8x)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.a1111 and not args.ldm:
        parser.error("--a1111 needs --ldm")

    comfy = import_comfyui(args.comfyui.resolve()) if args.comfyui else None
    a1111_guess = import_a1111(args.a1111.resolve(), args.ldm.resolve(),
                                                  args.sgm.resolve() if args.sgm else None) if args.a1111 else None
    rows: list[dict] = []
    archs = ([] if args.no_sd15 else ["sd15"]) + (["sdxl"] if args.sdxl else [])
    for arch in archs:
        check_architecture(arch, args, comfy, a1111_guess, rows)
        gc.collect()
    print_table(rows)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
