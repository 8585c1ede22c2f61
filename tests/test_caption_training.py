"""Captioning wired into the CLI and into training (--caption_missing)."""

import dataclasses

import pytest

from sdtune import train_lora
from sdtune.cli import main
from sdtune.data.sources import find_records
from sdtune.toy import render_shape_dataset
from sdtune.toy.tiny_captioner import build_tiny_blip2


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture
def uncaptioned(tmp_path):
    folder = render_shape_dataset(tmp_path / "images", num_images=4)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def test_cli_caption_writes_txt_beside_each_image(uncaptioned, tiny_blip2, capsys):
    assert main(["caption", str(uncaptioned), "--model", str(tiny_blip2), "--prefix", "sks shape,", "--batch_size", "3",
                 "--max_new_tokens", "4"]) == 0
    assert "captioned 4, skipped 0" in capsys.readouterr().out
    captions = [p.read_text() for p in sorted(uncaptioned.glob("*.txt"))]
    assert len(captions) == 4 and all(c.startswith("sks shape,") for c in captions)
    assert main(["caption", str(uncaptioned), "--model", str(tiny_blip2)]) == 0  # a rerun keeps them
    assert "captioned 0, skipped 4" in capsys.readouterr().out


def test_training_with_caption_missing_captions_first_and_trains_on_them(uncaptioned, tiny_blip2, lora_config):
    config = dataclasses.replace(lora_config, instance_data_dir=str(uncaptioned), caption_missing=True,
                                 caption_model=str(tiny_blip2), max_train_steps=2)
    result = train_lora(config)
    records = find_records(instance_data_dir=str(uncaptioned))
    assert len(records) == 4 and all(r.caption for r in records)  # every image captioned before training read them
    assert result.global_step == 2


def test_without_caption_missing_uncaptioned_images_are_an_error(uncaptioned, lora_config):
    from sdtune.errors import DataError

    with pytest.raises(DataError, match=r"4 image\(s\) have no caption"):
        train_lora(dataclasses.replace(lora_config, instance_data_dir=str(uncaptioned)))
