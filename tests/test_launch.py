"""Every way users start sdtune: console script, python -m, `python sdtune` / `accelerate launch sdtune`
from the repository root, and two CPU processes under accelerate (which must equal one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _train_args(tiny_model, shapes_dir, output_dir, *extra):
    return ["train-lora", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(shapes_dir),
            "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--random_flip", *extra]


def _run(cmd, cwd, **env):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stderr[-3000:]}"
    return result


def _losses(output_dir):
    return json.loads((Path(output_dir) / "checkpoint-4" / "trainer_state.json").read_text())["loss_history"]


def test_python_m_sdtune_trains_from_any_directory(tiny_model, shapes_dir, tmp_path):
    result = _run([sys.executable, "-m", "sdtune", *_train_args(tiny_model, shapes_dir, tmp_path / "out")], cwd=tmp_path)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "done: 4 steps" in result.stdout


def test_console_script_and_python_sdtune_from_the_repo_root(tmp_path):
    listed = _run([str(BIN / "sdtune"), "--help"], cwd=tmp_path).stdout
    assert "train-lora" in listed and "demo" in listed
    # `python sdtune` puts sdtune/ first on sys.path; __main__ must undo that
    printed = _run([sys.executable, "sdtune", "train-lora", "--rank", "7", "--print-config"], cwd=REPO).stdout
    assert "rank: 7" in printed


def test_accelerate_launch_sdtune_from_the_repo_root(tiny_model, shapes_dir, tmp_path):
    _run([str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "sdtune", *_train_args(tiny_model, shapes_dir, tmp_path / "out")], cwd=REPO)
    assert (tmp_path / "out" / "kohya_lora.safetensors").is_file()


def test_user_mistakes_print_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdtune", "train-lora", "--pretrained_model_name_or_path", "x",
                             "--instance_data_dir", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"sdtune: error: --instance_data_dir {tmp_path / 'missing'}: no such folder"]
    result = subprocess.run([sys.executable, "-m", "sdtune", "train-lorra"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'train-lora'?" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model"])
def test_two_cpu_processes_equal_one_process_with_the_same_global_batch(model, shapes_dir, tmp_path, request):
    """SDXL too: its pooled embedding and size numbers are split across processes like the latents."""
    tiny_model = request.getfixturevalue(model)
    two = tmp_path / "two"
    _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtune",
          *_train_args(tiny_model, shapes_dir, two, "--train_batch_size", "1")], cwd=tmp_path, ACCELERATE_USE_CPU="1")
    one = tmp_path / "one"
    _run([sys.executable, "-m", "sdtune", *_train_args(tiny_model, shapes_dir, one, "--train_batch_size", "2")], cwd=tmp_path)
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6)
    a, b = load_file(two / "pytorch_lora_weights.safetensors"), load_file(one / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # DDP sums gradients in another order; Adam's normalisation magnifies that on near-zero gradients
        # (lr 1e-3 x 4 steps moves weights by ~4e-3, so 3e-5 is under 1 % of a step's change)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=3e-5)
    # only the main process writes: one export, one checkpoint
    assert sorted(p.name for p in two.iterdir() if p.is_dir()) == ["checkpoint-4"]


def test_importing_sdtune_prints_no_torchvision_fallback_notice(tmp_path):
    # Without torchvision, transformers notes that an image processor falls back to its PIL twin when
    # the name is first looked up (diffusers' pipeline modules do it when some optional packages,
    # e.g. `kernels`, are installed); sdtune does without torchvision on purpose, so it is noise.
    code = "import {}; import transformers; transformers.CLIPImageProcessor"
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here: transformers has nothing to fall back from")
    except Exception:
        pass
    notice = "requires torchvision (not installed)"
    # transformers' default verbosity, as in a user's Python session (the CLI lowers it, and a CLI test
    # run in this process may have set TRANSFORMERS_VERBOSITY for the processes it starts)
    env = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    without_sdtune = _run([sys.executable, "-c", code.format("transformers")], cwd=tmp_path, **env)
    assert notice in without_sdtune.stderr  # the control: what users saw before
    with_sdtune = _run([sys.executable, "-c", code.format("sdtune.api")], cwd=REPO, **env)
    assert notice not in with_sdtune.stderr
