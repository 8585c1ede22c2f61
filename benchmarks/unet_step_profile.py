"""Where a LoRA training step's time goes on the SD 1.5 architecture (CPU), and what torch.compile does to it.

The step is sdtune's LoRA step without the caches around it (they are timed in vs_diffusers.py): the UNet
with rank-4 attention LoRA (peft, as `sdtune train-lora` injects it), forward on one cached-size latent and a
77-token text embedding, MSE loss, backward. Per resolution it reports:

- eager: steady-state seconds per step, and each top-level UNet block's forward and backward time,
  timed alone on the inputs it received in a real forward (so the parts add up to about the step),
  with the floating-point operations of each (torch's FlopCounterMode over one step, forward and
  backward) and the rate they run at, against the rate of a large fp32 matrix product on the same
  threads (the fastest this CPU does the step's arithmetic);
- compiled: sdtune's --compile (each repeated block class compiled once, inductor's CPU backend): the
  first step (compile time) in a fresh cache, the first step again in a second process that reuses
  the on-disk cache, and the steady state.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/unet_step_profile.py --work /tmp/profile --resolutions 256 512

Each measurement runs in its own process with the same thread count (all usable cores, as sdtune picks on
a quiet machine), so the compiled and eager numbers do not share allocator or compile state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model: Path, resolution: int, compiled: bool, steps: int, profile: bool) -> dict:
    """In this process: build the LoRA UNet, run ``steps`` steps, return the timings."""
    import torch

    from sdtune.config import LoRAConfig
    from sdtune.loop import compile_repeated_blocks
    from sdtune.methods.lora import LoRAMethod
    from sdtune.models import load_components
    from sdtune.threads import set_torch_threads

    threads = set_torch_threads()
    components = load_components(str(model))
    method = LoRAMethod(LoRAConfig(pretrained_model_name_or_path=str(model), rank=4))
    method.prepare(components)
    unet = components.unet
    if compiled:
        compile_repeated_blocks(unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    target = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([500])
    blocks = {"conv_in": unet.conv_in, **{f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)},
              "mid_block": unet.mid_block, **{f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)},
              "conv_out": unet.conv_out}
    inputs = {}
    if profile:  # each block's inputs in a real forward, to time the block alone afterwards
        handles = [block.register_forward_hook(lambda m, a, kw, o, n=name: inputs.__setitem__(n, (a, kw)), with_kwargs=True)
                   for name, block in blocks.items()]
        with torch.no_grad():
            unet(latents, timesteps, encoder_hidden_states=text)
        for handle in handles:
            handle.remove()
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        prediction = unet(latents, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        unet.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    result = {"resolution": resolution, "compiled": compiled, "threads": threads, "step_seconds": step_times}
    if profile:
        with flop_counter() as counter:
            prediction = unet(latents, timesteps, encoder_hidden_states=text).sample
            torch.nn.functional.mse_loss(prediction, target).backward()
        unet.zero_grad(set_to_none=True)
        result["flops"] = {"step": counter.get_total_flops()}
        result["matmul_flops_per_second"] = matmul_rate()
        result["forward"], result["backward"] = {}, {}
        for name, block in blocks.items():
            timing = time_block(block, *inputs[name], repeats=3)
            result["forward"][name], result["backward"][name], result["flops"][name] = timing
    return result


def flop_counter():
    """torch's FlopCounterMode, with the CPU's attention kernels (not in torch's table) counted as the CUDA ones are."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }
    return flop_counter.FlopCounterMode(display=False, custom_mapping=attention)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """fp32 operations per second of a large matrix product on this process's threads (best of ``repeats``)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_block(block, args: tuple, kwargs: dict, repeats: int) -> tuple[float, float, int]:
    """Median forward and backward seconds of one block alone, on the inputs it got in the UNet's forward, and the
    floating-point operations of the two (counted in the untimed first run)."""
    import torch

    def leaf(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().requires_grad_(True)
        if isinstance(value, (tuple, list)):
            return type(value)(leaf(v) for v in value)
        return value

    def run() -> tuple[float, float]:
        args_, kwargs_ = leaf(args), {k: leaf(v) for k, v in kwargs.items()}
        start = time.perf_counter()
        output = block(*args_, **kwargs_)
        middle = time.perf_counter()
        tensors = [t for t in _flatten(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        return middle - start, time.perf_counter() - middle

    with flop_counter() as counter:  # also warms the allocator
        run()
    forwards, backwards = zip(*(run() for _ in range(repeats)))
    return statistics.median(forwards), statistics.median(backwards), counter.get_total_flops()


def _flatten(value):
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif hasattr(value, "sample"):
        yield value.sample
    else:
        yield value


def child(model: Path, resolution: int, compiled: bool, steps: int, profile: bool, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import unet_step_profile as p; "
            f"print('RESULT', json.dumps(p.measure(Path({str(model)!r}), {resolution}, {compiled}, {steps}, {profile})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no_compile", action="store_true", help="Only the eager profile.")
    parser.add_argument("--smoke", action="store_true", help="A tiny model of the same shape, to check the script.")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_diffusers import ensure_model

    model, _ = ensure_model(args.work, smoke=args.smoke)
    results = []
    for resolution in args.resolutions:
        eager = child(model, resolution, False, args.steps, True, args.work / "unused-cache")
        results.append(eager)
        row = {"resolution": resolution, "eager_steady": statistics.median(eager["step_seconds"][1:])}
        if not args.no_compile:
            cache = args.work / f"inductor-cache-{resolution}"
            cold = child(model, resolution, True, args.steps, False, cache)
            warm = child(model, resolution, True, 2, False, cache)
            results += [cold, warm]
            row.update(compiled_first_cold=cold["step_seconds"][0], compiled_first_warm=warm["step_seconds"][0],
                       compiled_steady=statistics.median(cold["step_seconds"][1:]))
        print(json.dumps(row), flush=True)
        total_f, total_b = sum(eager["forward"].values()), sum(eager["backward"].values())
        flops, matmul = eager["flops"], eager["matmul_flops_per_second"]
        step_rate = flops["step"] / row["eager_steady"]
        print(f"\n{resolution} px, eager, {eager['threads']} threads: step {row['eager_steady']:.2f} s "
              f"(the blocks alone: forward {total_f:.2f} s, backward {total_b:.2f} s); {flops['step'] / 1e9:.0f} GFLOP "
              f"at {step_rate / 1e9:.0f} GFLOP/s, {step_rate / matmul:.0%} of a 2048x2048 fp32 matmul's "
              f"{matmul / 1e9:.0f} GFLOP/s")
        print("| block | forward s | backward s | share of the step | GFLOP | GFLOP/s | of the matmul rate |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in eager["forward"]:
            f, b = eager["forward"][name], eager["backward"].get(name, 0.0)
            rate = flops[name] / (f + b) if f + b else 0.0
            print(f"| {name} | {f:.3f} | {b:.3f} | {(f + b) / row['eager_steady']:.0%} | {flops[name] / 1e9:.1f} "
                  f"| {rate / 1e9:.0f} | {rate / matmul:.0%} |")
    (args.work / "unet_step_profile.json").write_text(json.dumps(results, indent=1))
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; raw timings in {args.work / 'unet_step_profile.json'}")


if __name__ == "__main__":
    main()
