"""diffusers' own SD 1.x example tests, with sdtune in place of the script.

Each test below is one test of examples/dreambooth/test_dreambooth.py, test_dreambooth_lora.py,
examples/text_to_image/test_text_to_image_lora.py, examples/textual_inversion/test_textual_inversion.py
or examples/controlnet/test_controlnet.py (same name, same flags and values), run through sdtune's CLI
and asserting what the diffusers test asserts. Only the Hub ids are local stand-ins: the tiny model
fixture for hf-internal-testing/tiny-stable-diffusion-torch, four uncaptioned images for
docs/source/en/imgs, an imagefolder with a text column for hf-internal-testing/dummy_image_text_data,
and for the ControlNet tests a parquet dataset with image, conditioning_image and text columns for
hf-internal-testing/fill10, and ControlNets copied from the tiny UNets for the tiny-controlnet ids.
"""

import json
import os
import shutil

import pytest
import safetensors.torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from sdtune.cli import main
from sdtune.toy import render_shape_dataset

# the diffusers script → the sdtune command that replaces it
PROGRAMS = {
    "examples/dreambooth/train_dreambooth.py": ["train-dreambooth"],
    "examples/dreambooth/train_dreambooth_lora.py": ["train-dreambooth", "--use_lora"],
    "examples/text_to_image/train_text_to_image_lora.py": ["train-lora"],
    "examples/textual_inversion/textual_inversion.py": ["train-textual-inversion"],
    "examples/controlnet/train_controlnet.py": ["train-controlnet"],
    "examples/controlnet/train_controlnet_sdxl.py": ["train-controlnet"],
}


@pytest.fixture(scope="module")
def stand_ins(tiny_model, tmp_path_factory):
    """Local stand-ins for the Hub model and the two data sets the diffusers tests use."""
    root = tmp_path_factory.mktemp("diffusers-data")
    imgs = render_shape_dataset(root / "imgs", num_images=4)
    for caption in imgs.glob("*.txt"):  # docs/source/en/imgs has no captions: --instance_prompt applies
        caption.unlink()
    dataset = render_shape_dataset(root / "dummy_image_text_data", num_images=4)
    lines = [json.dumps({"file_name": png.name, "text": f"a shape {i}"}) for i, png in enumerate(sorted(dataset.glob("*.png")))]
    (dataset / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for caption in dataset.glob("*.txt"):
        caption.unlink()
    return {
        "hf-internal-testing/tiny-stable-diffusion-torch": str(tiny_model),
        "docs/source/en/imgs": str(imgs),
        "hf-internal-testing/dummy_image_text_data": str(dataset),
    }


@pytest.fixture
def run(stand_ins):
    def run(test_args: str) -> None:
        script, *args = test_args.split()
        assert main([*PROGRAMS[script], *(_local(a, stand_ins) for a in args)]) == 0

    return run


def _local(arg: str, stand_ins: dict) -> str:
    for hub_id, path in stand_ins.items():
        arg = arg.replace(hub_id, path)
    return arg


def _checkpoints(tmpdir) -> set[str]:
    return {x for x in os.listdir(tmpdir) if "checkpoint" in x}


def _pipeline(path: str, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(path, safety_checker=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- test_dreambooth.py


def test_dreambooth(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir docs/source/en/imgs
        --instance_prompt photo
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        """)
    assert os.path.isfile(os.path.join(tmpdir, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(tmpdir, "scheduler", "scheduler_config.json"))


def test_dreambooth_checkpointing(run, tmp_path, stand_ins):
    instance_prompt = "photo"
    pretrained_model_name_or_path = "hf-internal-testing/tiny-stable-diffusion-torch"
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path {pretrained_model_name_or_path}
        --instance_data_dir docs/source/en/imgs
        --instance_prompt {instance_prompt}
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 4
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=2
        --seed=0
        """)
    _pipeline(str(tmpdir))(instance_prompt, num_inference_steps=1)
    assert os.path.isdir(os.path.join(tmpdir, "checkpoint-2"))
    assert os.path.isdir(os.path.join(tmpdir, "checkpoint-4"))
    unet = UNet2DConditionModel.from_pretrained(tmpdir, subfolder="checkpoint-2/unet")
    _pipeline(stand_ins[pretrained_model_name_or_path], unet=unet)(instance_prompt, num_inference_steps=1)
    shutil.rmtree(os.path.join(tmpdir, "checkpoint-2"))

    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path {pretrained_model_name_or_path}
        --instance_data_dir docs/source/en/imgs
        --instance_prompt {instance_prompt}
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 6
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=2
        --resume_from_checkpoint=checkpoint-4
        --seed=0
        """)
    _pipeline(str(tmpdir))(instance_prompt, num_inference_steps=1)
    assert not os.path.isdir(os.path.join(tmpdir, "checkpoint-2"))
    assert os.path.isdir(os.path.join(tmpdir, "checkpoint-4"))
    assert os.path.isdir(os.path.join(tmpdir, "checkpoint-6"))


def test_dreambooth_checkpointing_checkpoints_total_limit(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=6
        --checkpoints_total_limit=2
        --checkpointing_steps=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}


def test_dreambooth_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=4
        --checkpointing_steps=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4"}
    run(f"""
        examples/dreambooth/train_dreambooth.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=8
        --checkpointing_steps=2
        --resume_from_checkpoint=checkpoint-4
        --checkpoints_total_limit=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-6", "checkpoint-8"}


# ----------------------------------------------------------------------------- test_dreambooth_lora.py


def _lora_keys(tmpdir) -> list[str]:
    assert os.path.isfile(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
    return list(safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors")))


def test_dreambooth_lora(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth_lora.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir docs/source/en/imgs
        --instance_prompt photo
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        """)
    keys = _lora_keys(tmpdir)
    assert all("lora" in k for k in keys)
    assert all(k.startswith("unet") for k in keys)


def test_dreambooth_lora_with_text_encoder(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth_lora.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir docs/source/en/imgs
        --instance_prompt photo
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --train_text_encoder
        --output_dir {tmpdir}
        """)
    keys = _lora_keys(tmpdir)
    assert any(k.startswith("text_encoder") for k in keys)
    assert all(k.startswith("unet") or k.startswith("text_encoder") for k in keys)


def test_dreambooth_lora_checkpointing_checkpoints_total_limit(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth_lora.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=6
        --checkpoints_total_limit=2
        --checkpointing_steps=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}


def test_dreambooth_lora_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/dreambooth/train_dreambooth_lora.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=4
        --checkpointing_steps=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4"}
    run(f"""
        examples/dreambooth/train_dreambooth_lora.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --instance_data_dir=docs/source/en/imgs
        --output_dir={tmpdir}
        --instance_prompt=prompt
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=8
        --checkpointing_steps=2
        --resume_from_checkpoint=checkpoint-4
        --checkpoints_total_limit=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-6", "checkpoint-8"}


# ----------------------------------------------------------------------------- test_text_to_image_lora.py


def test_text_to_image_lora_checkpointing_checkpoints_total_limit(run, tmp_path, stand_ins):
    pretrained_model_name_or_path = "hf-internal-testing/tiny-stable-diffusion-torch"
    prompt = "a prompt"
    tmpdir = tmp_path
    run(f"""
        examples/text_to_image/train_text_to_image_lora.py
        --pretrained_model_name_or_path {pretrained_model_name_or_path}
        --dataset_name hf-internal-testing/dummy_image_text_data
        --resolution 64
        --center_crop
        --random_flip
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 6
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=2
        --checkpoints_total_limit=2
        --seed=0
        --num_validation_images=0
        """)
    pipe = _pipeline(stand_ins[pretrained_model_name_or_path])
    pipe.load_lora_weights(tmpdir)
    pipe(prompt, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}


def test_text_to_image_lora_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(run, tmp_path, stand_ins):
    pretrained_model_name_or_path = "hf-internal-testing/tiny-stable-diffusion-torch"
    prompt = "a prompt"
    tmpdir = tmp_path
    run(f"""
        examples/text_to_image/train_text_to_image_lora.py
        --pretrained_model_name_or_path {pretrained_model_name_or_path}
        --dataset_name hf-internal-testing/dummy_image_text_data
        --resolution 64
        --center_crop
        --random_flip
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 4
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=2
        --seed=0
        --num_validation_images=0
        """)
    pipe = _pipeline(stand_ins[pretrained_model_name_or_path])
    pipe.load_lora_weights(tmpdir)
    pipe(prompt, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4"}
    run(f"""
        examples/text_to_image/train_text_to_image_lora.py
        --pretrained_model_name_or_path {pretrained_model_name_or_path}
        --dataset_name hf-internal-testing/dummy_image_text_data
        --resolution 64
        --center_crop
        --random_flip
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 8
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=2
        --resume_from_checkpoint=checkpoint-4
        --checkpoints_total_limit=2
        --seed=0
        --num_validation_images=0
        """)
    pipe = _pipeline(stand_ins[pretrained_model_name_or_path])
    pipe.load_lora_weights(tmpdir)
    pipe(prompt, num_inference_steps=1)
    assert _checkpoints(tmpdir) == {"checkpoint-6", "checkpoint-8"}


# ----------------------------------------------------------------------------- test_textual_inversion.py


def test_textual_inversion(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/textual_inversion/textual_inversion.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --train_data_dir docs/source/en/imgs
        --learnable_property object
        --placeholder_token <cat-toy>
        --initializer_token a
        --save_steps 1
        --num_vectors 2
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        """)
    assert os.path.isfile(os.path.join(tmpdir, "learned_embeds.safetensors"))


def test_textual_inversion_checkpointing(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/textual_inversion/textual_inversion.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --train_data_dir docs/source/en/imgs
        --learnable_property object
        --placeholder_token <cat-toy>
        --initializer_token a
        --save_steps 1
        --num_vectors 2
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 3
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=1
        --checkpoints_total_limit=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-3"}


def test_textual_inversion_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(run, tmp_path):
    tmpdir = tmp_path
    run(f"""
        examples/textual_inversion/textual_inversion.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --train_data_dir docs/source/en/imgs
        --learnable_property object
        --placeholder_token <cat-toy>
        --initializer_token a
        --save_steps 1
        --num_vectors 2
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=1
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-1", "checkpoint-2"}
    run(f"""
        examples/textual_inversion/textual_inversion.py
        --pretrained_model_name_or_path hf-internal-testing/tiny-stable-diffusion-torch
        --train_data_dir docs/source/en/imgs
        --learnable_property object
        --placeholder_token <cat-toy>
        --initializer_token a
        --save_steps 1
        --num_vectors 2
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 2
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --output_dir {tmpdir}
        --checkpointing_steps=1
        --resume_from_checkpoint=checkpoint-2
        --checkpoints_total_limit=2
        """)
    # diffusers asserts {"checkpoint-2", "checkpoint-3"}: resumed at --max_train_steps, its script trains
    # one step past the end. sdtune stops where it was told (README, "diffusers command lines").
    assert _checkpoints(tmpdir) == {"checkpoint-1", "checkpoint-2"}


# ----------------------------------------------------------------------------- test_controlnet.py


@pytest.fixture(scope="module")
def controlnet_run(stand_ins, tiny_sdxl_model, tmp_path_factory):
    """``run`` with the ControlNet tests' stand-ins too: fill10, and a tiny ControlNet per tiny model."""
    import datasets
    from diffusers import ControlNetModel

    from sdtune.control import canny
    from sdtune.methods.controlnet import conditioning_embedding_channels
    from sdtune.models import load_components

    root = tmp_path_factory.mktemp("controlnet-data")
    images = render_shape_dataset(root / "images", num_images=4)
    edges = []
    for path in sorted(images.glob("*.png")):
        from PIL import Image

        canny(Image.open(path).convert("RGB")).save(root / f"edges-{path.name}")
        edges.append(str(root / f"edges-{path.name}"))
    table = datasets.Dataset.from_dict({"image": [str(p) for p in sorted(images.glob("*.png"))], "conditioning_image": edges,
                                        "text": [f"a shape {i}" for i in range(len(edges))]})
    table = table.cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    (root / "fill10" / "data").mkdir(parents=True)
    table.to_parquet(str(root / "fill10" / "data" / "train-00000-of-00001.parquet"))
    local = dict(stand_ins, **{"hf-internal-testing/fill10": str(root / "fill10"),
                               "hf-internal-testing/tiny-stable-diffusion-xl-pipe": str(tiny_sdxl_model)})
    for hub_id, model in (("hf-internal-testing/tiny-controlnet-sdxl", tiny_sdxl_model),
                          ("hf-internal-testing/tiny-controlnet", stand_ins["hf-internal-testing/tiny-stable-diffusion-torch"])):
        components = load_components(str(model))
        controlnet = ControlNetModel.from_unet(components.unet,
                                               conditioning_embedding_out_channels=conditioning_embedding_channels(components.vae))
        controlnet.save_pretrained(root / hub_id.split("/")[1])
        local[hub_id] = str(root / hub_id.split("/")[1])

    def run(test_args: str) -> None:
        script, *args = test_args.split()
        assert main([*PROGRAMS[script], *(_local(a, local) for a in args)]) == 0

    return run


def test_controlnet_checkpointing_checkpoints_total_limit(controlnet_run, tmp_path):
    tmpdir = tmp_path
    controlnet_run(f"""
        examples/controlnet/train_controlnet.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --dataset_name=hf-internal-testing/fill10
        --output_dir={tmpdir}
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --max_train_steps=6
        --checkpoints_total_limit=2
        --checkpointing_steps=2
        --controlnet_model_name_or_path=hf-internal-testing/tiny-controlnet
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-4", "checkpoint-6"}


def test_controlnet_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(controlnet_run, tmp_path):
    tmpdir = tmp_path
    controlnet_run(f"""
        examples/controlnet/train_controlnet.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --dataset_name=hf-internal-testing/fill10
        --output_dir={tmpdir}
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --controlnet_model_name_or_path=hf-internal-testing/tiny-controlnet
        --max_train_steps=6
        --checkpointing_steps=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    controlnet_run(f"""
        examples/controlnet/train_controlnet.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-torch
        --dataset_name=hf-internal-testing/fill10
        --output_dir={tmpdir}
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --controlnet_model_name_or_path=hf-internal-testing/tiny-controlnet
        --max_train_steps=8
        --checkpointing_steps=2
        --resume_from_checkpoint=checkpoint-6
        --checkpoints_total_limit=2
        """)
    assert _checkpoints(tmpdir) == {"checkpoint-6", "checkpoint-8"}


def test_controlnet_sdxl(controlnet_run, tmp_path):
    tmpdir = tmp_path
    controlnet_run(f"""
        examples/controlnet/train_controlnet_sdxl.py
        --pretrained_model_name_or_path=hf-internal-testing/tiny-stable-diffusion-xl-pipe
        --dataset_name=hf-internal-testing/fill10
        --output_dir={tmpdir}
        --resolution=64
        --train_batch_size=1
        --gradient_accumulation_steps=1
        --controlnet_model_name_or_path=hf-internal-testing/tiny-controlnet-sdxl
        --max_train_steps=4
        --checkpointing_steps=2
        """)
    assert os.path.isfile(os.path.join(tmpdir, "diffusion_pytorch_model.safetensors"))
