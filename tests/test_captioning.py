"""Captioning with tiny offline BLIP-2 / BLIP / InstructBLIP models: image-token traps, caption files, resume, sharding."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import captioning
from sdtune.caption_store import METADATA, PARTS_DIR, add_prefix_suffix, clean_caption, image_name
from sdtune.captioning import CaptionConfig, caption_images, caption_missing_images, load_captioner, model_family
from sdtune.errors import ConfigError, ModelLoadError, SdtuneError
from sdtune.toy.tiny_captioner import build_tiny_blip, build_tiny_blip2, build_tiny_instructblip

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a.png", "b.jpg", "c.png", "d.webp", "sub/e.png", "sub/f.jpg"]


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture
def images_dir(tmp_path):
    """Six different noise images of different sizes, two in a subfolder, no captions."""
    folder = tmp_path / "images"
    for seed, name in enumerate(NAMES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (24 + 8 * seed, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return folder


def _config(folder, model, **options):
    options = {"batch_size": 4, "max_new_tokens": 6, "min_length": 2, **options}
    return CaptionConfig(data_dir=str(folder), model=str(model), **options)


def _txt(folder, name):
    return (folder / name).with_suffix(".txt").read_text().strip()


def _jsonl(folder):
    return [json.loads(line) for line in (folder / METADATA).read_text().splitlines()]


def _edit_json(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def _noise(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


# --- BLIP-2 image tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy-snapshot"])
def test_two_images_give_different_inputs_with_one_image_token_per_query(tiny_blip2, tmp_path, legacy):
    # legacy: no <image> in the vocabulary, image_token_index and the processor's num_query_tokens unset
    model_dir = build_tiny_blip2(tmp_path / "legacy", legacy=True) if legacy else tiny_blip2
    captioner = load_captioner(_config(tmp_path, model_dir))
    config, processor = captioner.model.config, captioner.processor
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config.image_token_index == image_token_id
    assert processor.num_query_tokens == config.num_query_tokens == 4
    assert image_token_id < captioner.model.get_input_embeddings().num_embeddings

    batch = captioner.inputs([_noise(1), _noise(2)])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert (batch["input_ids"] == image_token_id).sum(dim=1).tolist() == [config.num_query_tokens] * 2
    with torch.no_grad():
        logits = captioner.model(**batch).logits[:, -1]  # [2, vocab]: the image reaches the language model
    assert not torch.allclose(logits[0], logits[1])
    assert len(captioner.generate([_noise(1), _noise(2)])) == 2


@pytest.mark.parametrize("file, key, value, message", [
    ("processor_config.json", "num_query_tokens", 3, "num_query_tokens"),
    ("config.json", "image_token_index", 5, "image_token_index"),
])
def test_inconsistent_image_token_setup_is_a_clear_error(tiny_blip2, tmp_path, file, key, value, message):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    for path in tiny_blip2.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    _edit_json(model_dir / file, **{key: value})
    with pytest.raises(ModelLoadError, match=message):
        load_captioner(_config(tmp_path, model_dir))


@pytest.mark.parametrize("builder, family", [
    (build_tiny_blip2, "blip-2"),
    (lambda d: build_tiny_blip2(d, text_model="t5"), "blip-2"),
    (build_tiny_blip, "blip"),
    (build_tiny_instructblip, "instructblip"),
], ids=["blip2-opt", "blip2-t5", "blip", "instructblip"])
def test_every_family_loads_from_a_local_folder_and_captions(builder, family, images_dir, tmp_path):
    model_dir = builder(tmp_path / "model")
    assert sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) < 500_000
    assert model_family(str(model_dir)) == family
    summary = caption_images(_config(images_dir, model_dir, prompt="a photo of"))
    assert summary.captioned == len(NAMES) and summary.failed == 0
    captions = [_txt(images_dir, name) for name in NAMES]
    assert all(captions) and not any(c.startswith("a photo of") for c in captions)  # no echoed prompt


def test_unknown_model_type_names_the_supported_types(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match=r"is a 'gpt2' model; supported types: blip-2, blip, instructblip"):
        load_captioner(_config(tmp_path, tmp_path / "gpt2"))


def test_8bit_without_cuda_is_a_clear_error(tiny_blip2, images_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--load_in_8bit needs a CUDA GPU \(bitsandbytes\)"):
        caption_images(_config(images_dir, tiny_blip2, load_in_8bit=True))


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size"), ({"num_beams": 0}, "num_beams"), ({"min_length": 50}, "min_length"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "exclude each other"), ({"output_format": "csv"}, "output_format"),
    ({"caption_extension": "txt"}, "dot"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(_config("x", "y"), **options)


# --- caption files ----------------------------------------------------------------------------------


def test_captions_are_written_beside_each_image_with_prefix_and_suffix(tiny_blip2, images_dir):
    summary = caption_images(_config(images_dir, tiny_blip2, prefix="photo of sks dog,", suffix=", best quality"))
    assert (summary.captioned, summary.skipped, summary.failed) == (len(NAMES), 0, 0)
    captions = [_txt(images_dir, name) for name in NAMES]
    assert all(c.startswith("photo of sks dog, ") and c.endswith(", best quality") for c in captions)
    assert len(set(captions)) > 1  # the tiny model's words depend on the image
    assert not list(images_dir.rglob("*.tmp"))


def test_existing_captions_are_kept_unless_overwrite(tiny_blip2, images_dir):
    (images_dir / "a.txt").write_text("my own caption")
    summary = caption_images(_config(images_dir, tiny_blip2))
    assert (summary.captioned, summary.skipped) == (len(NAMES) - 1, 1)
    assert _txt(images_dir, "a.png") == "my own caption"
    summary = caption_images(_config(images_dir, tiny_blip2, overwrite=True))
    assert (summary.captioned, summary.skipped) == (len(NAMES), 0)
    assert _txt(images_dir, "a.png") != "my own caption"


def test_a_resumed_run_captions_only_the_images_left(tiny_blip2, images_dir):
    for name in NAMES[::2]:
        (images_dir / name).with_suffix(".txt").write_text(f"done {name}")
    (images_dir / "c.txt").write_text("  \n")  # an empty caption file counts as no caption
    summary = caption_images(_config(images_dir, tiny_blip2))
    assert (summary.captioned, summary.skipped) == (4, 2)
    assert _txt(images_dir, "a.png") == "done a.png" and _txt(images_dir, "sub/e.png") == "done sub/e.png"
    assert all(_txt(images_dir, name) and not _txt(images_dir, name).startswith("done") for name in NAMES[1::2] + ["c.png"])


def test_jsonl_output_lists_each_file_once_after_repeated_and_interrupted_runs(tiny_blip2, images_dir):
    (images_dir / METADATA).write_text(json.dumps({"file_name": "a.png", "text": "kept", "source": "me"}) + "\n")
    # a killed earlier run: one finished line and one cut short
    parts = images_dir / PARTS_DIR
    parts.mkdir()
    (parts / "part-1.jsonl").write_text(json.dumps({"file_name": "b.jpg", "text": "from the killed run"}) + '\n{"file_na')
    (images_dir / "c.txt").write_text("from a caption file")  # training would not read it beside a metadata.jsonl
    summary = caption_images(_config(images_dir, tiny_blip2, output_format="jsonl"))
    assert (summary.captioned, summary.skipped) == (len(NAMES) - 3, 3)
    entries = _jsonl(images_dir)
    assert sorted(e["file_name"] for e in entries) == sorted(NAMES)
    by_name = {e["file_name"]: e for e in entries}
    assert by_name["a.png"] == {"file_name": "a.png", "text": "kept", "source": "me"}
    assert by_name["b.jpg"]["text"] == "from the killed run" and by_name["c.png"]["text"] == "from a caption file"
    assert not parts.exists() and not list(images_dir.glob("*.tmp"))

    assert caption_images(_config(images_dir, tiny_blip2, output_format="jsonl")).captioned == 0
    summary = caption_images(_config(images_dir, tiny_blip2, output_format="jsonl", overwrite=True))
    assert summary.captioned == len(NAMES)
    entries = _jsonl(images_dir)
    assert sorted(e["file_name"] for e in entries) == sorted(NAMES)
    assert {e["file_name"]: e for e in entries}["a.png"]["source"] == "me"  # other columns survive a recaption


def test_unreadable_image_is_counted_as_failed_and_the_others_are_captioned(tiny_blip2, images_dir):
    (images_dir / "broken.png").write_bytes(b"not an image at all")
    summary = caption_images(_config(images_dir, tiny_blip2, batch_size=3))
    assert (summary.captioned, summary.failed, summary.failed_files) == (len(NAMES), 1, ["broken.png"])
    assert not (images_dir / "broken.txt").exists()


def test_a_run_that_captions_nothing_exits_non_zero_with_one_line(tiny_blip2, tmp_path, capsys):
    from sdtune.cli import main

    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(b"not an image at all")
    assert main(["caption", str(tmp_path), "--model", str(tiny_blip2)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdtune: error")]
    assert len(errors) == 1 and "no image" in errors[0] and "x.png" in errors[0]


def test_a_rerun_with_only_an_unreadable_image_left_succeeds(tiny_blip2, images_dir, capsys):
    from sdtune.cli import main

    (images_dir / "broken.png").write_bytes(b"not an image at all")
    args = ["caption", str(images_dir), "--model", str(tiny_blip2)]
    assert main(args) == 0  # first run: the good images captioned, the broken one failed
    assert main(args) == 0  # rerun: nothing left to caption but the broken image; that is success
    assert capsys.readouterr().out.splitlines()[-1] == f"captioned 0, skipped {len(NAMES)} (already captioned), failed 1"


def test_missing_folder_and_empty_folder_are_data_errors(tiny_blip2, tmp_path):
    with pytest.raises(SdtuneError, match="no such folder"):
        caption_images(_config(tmp_path / "missing", tiny_blip2))
    with pytest.raises(SdtuneError, match="no images"):
        caption_images(_config(tmp_path, tiny_blip2))


def test_caption_missing_images_only_fills_gaps(tiny_blip2, images_dir):
    (images_dir / "a.txt").write_text("mine")
    summary = caption_missing_images(str(images_dir), str(tiny_blip2), overwrite=True, max_new_tokens=4, batch_size=8)
    assert (summary.captioned, summary.skipped) == (len(NAMES) - 1, 1)
    assert _txt(images_dir, "a.png") == "mine"
    with pytest.raises(ConfigError, match="did you mean 'prefix'"):
        caption_missing_images(str(images_dir), str(tiny_blip2), prefx="x")


def test_each_process_captions_its_share_and_all_return_the_merged_summary(tiny_blip2, images_dir, monkeypatch):
    (images_dir / "a.txt").write_text("mine")  # pending: the other five, in sorted order
    (images_dir / "broken.png").write_bytes(b"junk")
    pending = sorted(NAMES + ["broken.png"])[1:]
    shards = {}
    real_shard = captioning._caption_shard

    def recording_shard(config, folder, paths, rank, accelerator):
        shards[rank] = [image_name(folder, path) for path in paths]
        return real_shard(config, folder, paths, rank, accelerator)

    monkeypatch.setattr(captioning, "_caption_shard", recording_shard)
    load_lock, real_load = threading.Lock(), captioning.load_captioner

    def serial_load(*args, **kwargs):
        with load_lock:  # from_pretrained patches torch globally (meta device); real processes do not share that
            return real_load(*args, **kwargs)

    monkeypatch.setattr(captioning, "load_captioner", serial_load)
    barrier = threading.Barrier(2, timeout=60)  # two threads stand in for two processes

    def run(rank):
        accelerator = SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0,
                                      device=torch.device("cpu"), mixed_precision="no", wait_for_everyone=barrier.wait)
        return caption_images(_config(images_dir, tiny_blip2, output_format="jsonl"), accelerator)

    with ThreadPoolExecutor(2) as pool:
        summaries = [future.result() for future in [pool.submit(run, rank) for rank in (0, 1)]]
    assert shards == {0: pending[0::2], 1: pending[1::2]}
    assert summaries[0] == summaries[1]
    assert (summaries[0].captioned, summaries[0].skipped, summaries[0].failed_files) == (len(NAMES) - 1, 1, ["broken.png"])
    assert sorted(e["file_name"] for e in _jsonl(images_dir)) == sorted(NAMES)
    assert not (images_dir / PARTS_DIR).exists()


# --- cleanup ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, prompt, expected", [
    ("  a dog   on\n a  couch ", None, "a dog on a couch"),
    ("a dog dog dog", None, "a dog"),
    ("a cat, a cat, a cat", None, "a cat"),
    ("a cat, a cat, a cat sitting on a mat", None, "a cat sitting on a mat"),
    ("the The the man riding a horse horse", None, "the man riding a horse"),
    ("red and blue red and blue", None, "red and blue"),
    ("a photo of a dog on the beach", "a photo of", "a dog on the beach"),
    ("A photo of: a dog", "a photo of", "a dog"),
    ("a photo offers a view", "a photo of", "a photo offers a view"),
    ("a photo of a photo of a dog", "a photo of", "a dog"),
    ("a man and a woman and a child", None, "a man and a woman and a child"),
    ("a dog,", None, "a dog"),
    ("a photo of", "a photo of", ""),
    ("", None, ""),
])
def test_clean_caption(raw, prompt, expected):
    assert clean_caption(raw, prompt) == expected


@pytest.mark.parametrize("prefix, suffix, expected", [
    ("", "", "a dog"), ("sks", "", "sks a dog"), ("sks, ", "", "sks, a dog"),
    ("", ", best", "a dog, best"), ("", "best", "a dog best"), ("photo of sks,", " 4k", "photo of sks, a dog 4k"),
])
def test_prefix_and_suffix_are_joined_with_one_space(prefix, suffix, expected):
    assert add_prefix_suffix("a dog", prefix, suffix) == expected


# --- two processes ---------------------------------------------------------------------------------

SCRIPT = """
import dataclasses, json, pathlib, sys
from accelerate import Accelerator
from sdtune.captioning import CaptionConfig, caption_images

accelerator = Accelerator()
for folder, output_format in ((sys.argv[1], "txt"), (sys.argv[2], "jsonl")):
    config = CaptionConfig(data_dir=folder, model=sys.argv[3], output_format=output_format, batch_size=2, max_new_tokens=4)
    summary = caption_images(config, accelerator)
    result = {"num_processes": accelerator.num_processes, **dataclasses.asdict(summary)}
    pathlib.Path(folder, f"summary-{accelerator.process_index}.json").write_text(json.dumps(result))
accelerator.end_training()  # destroys the process group; exiting with it alive can abort gloo ("terminate called ...")
"""


@pytest.mark.slow
def test_two_processes_caption_every_image_exactly_once(tiny_blip2, images_dir, tmp_path):
    (images_dir / "a.txt").write_text("mine")
    (images_dir / "broken.png").write_bytes(b"junk")
    jsonl_dir = tmp_path / "jsonl-images"
    jsonl_dir.mkdir()
    for path in images_dir.rglob("*.*"):
        (jsonl_dir / path.relative_to(images_dir)).parent.mkdir(exist_ok=True)
        (jsonl_dir / path.relative_to(images_dir)).write_bytes(path.read_bytes())
    script = tmp_path / "caption.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), str(images_dir), str(jsonl_dir), str(tiny_blip2)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in (images_dir, jsonl_dir):
        summaries = [json.loads((folder / f"summary-{rank}.json").read_text()) for rank in (0, 1)]
        assert summaries[0] == summaries[1]  # every process returns the merged summary
        assert summaries[0] == {"num_processes": 2, "captioned": len(NAMES) - 1, "skipped": 1, "failed": 1,
                                "failed_files": ["broken.png"]}
    assert _txt(images_dir, "a.png") == "mine" and all(_txt(images_dir, name) for name in NAMES)
    captions = {e["file_name"]: e["text"] for e in _jsonl(jsonl_dir)}
    assert len(_jsonl(jsonl_dir)) == len(captions) and sorted(captions) == sorted(NAMES)
    assert captions["a.png"] == "mine" and not (jsonl_dir / PARTS_DIR).exists()
