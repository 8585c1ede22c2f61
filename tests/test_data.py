"""Data: sources, bad images, captions, buckets, batch order, and the content-keyed latent cache."""

import dataclasses
import io
import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.cache import LatentCache, TextEmbeddingCache
from sdtune.data.captions import augment_caption
from sdtune.data.dataset import BucketBatchSampler, TrainDataset, prepare_samples
from sdtune.data.images import choose_bucket, make_buckets, open_rgb, to_tensor
from sdtune.data.sources import find_records
from sdtune.errors import DataError
from sdtune.models import load_components


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient(w=64, h=64):
    x = np.linspace(0, 255, w, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (h, 1))] * 3, axis=-1))


# ----------------------------------------------------------------------------- sources


def test_kohya_folder_pairs_each_image_with_its_txt(tmp_path):
    _gradient().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red cat\n")
    (tmp_path / "sub").mkdir()
    _gradient().save(tmp_path / "sub" / "b.jpg")
    records = find_records(instance_data_dir=str(tmp_path))
    assert [(r.path.name, r.caption) for r in records] == [("a.png", "a red cat"), ("b.jpg", None)]


def test_metadata_jsonl_folder(tmp_path):
    for name in ("x.png", "y.png"):
        _gradient().save(tmp_path / name)
    lines = [{"file_name": "x.png", "text": "cap x"}, {"file_name": "y.png", "text": "cap y"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(entry) for entry in lines))
    records = find_records(instance_data_dir=str(tmp_path))
    assert sorted(r.caption for r in records) == ["cap x", "cap y"]
    assert open_rgb(records[0].read_bytes()).size == (64, 64)


def test_bad_metadata_line_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"text": "no file"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2: missing 'file_name'"):
        find_records(instance_data_dir=str(tmp_path))


def test_datasets_dataset_with_custom_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"img": [{"bytes": _png(_gradient()), "path": None}] * 3, "prompt": ["p0", "p1", "p2"]})
    ds = ds.cast_column("img", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    records = find_records(dataset_name=str(tmp_path), image_column="img", caption_column="prompt")
    assert [r.caption for r in records] == ["p0", "p1", "p2"]
    assert open_rgb(records[2].read_bytes()).size == (64, 64)
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: img, prompt\); set --caption_column"):
        find_records(dataset_name=str(tmp_path), image_column="img")


def test_missing_folder_and_empty_dataset_are_clear(tmp_path):
    with pytest.raises(DataError, match="--instance_data_dir .*nope: no such folder"):
        find_records(instance_data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="has no usable image"):
        prepare_samples(find_records(instance_data_dir=str(tmp_path)), resolution=64, source=str(tmp_path))
    with pytest.raises(DataError, match="no training data: pass --instance_data_dir"):
        find_records()


def test_images_without_caption_need_instance_prompt(tmp_path):
    _gradient().save(tmp_path / "a.png")
    records = find_records(instance_data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"1 image\(s\) have no caption .*a.png.*--instance_prompt"):
        prepare_samples(records, resolution=64)
    assert prepare_samples(records, resolution=64, instance_prompt="sks")[0].caption == "sks"


# ----------------------------------------------------------------------------- bad images


def test_bad_images_are_converted_or_skipped_with_a_warning(tmp_path, caplog):
    good = _gradient()
    good.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)).save(tmp_path / "grey16.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    rgba.save(tmp_path / "rgba.png")
    exif = Image.new("RGB", (96, 64), (200, 10, 10))
    exif_info = exif.getexif()
    exif_info[0x0112] = 6  # "rotate 90° clockwise to display"
    exif.save(tmp_path / "rotated.jpg", exif=exif_info)
    data = (tmp_path / "cmyk.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    _gradient(8, 8).save(tmp_path / "tiny.png")
    for path in tmp_path.iterdir():
        path.with_suffix(".txt").write_text("x")

    with caplog.at_level(logging.WARNING):
        samples = prepare_samples(find_records(instance_data_dir=str(tmp_path)), resolution=64)
    kept = {s.record.path.name: s for s in samples}
    assert set(kept) == {"cmyk.jpg", "grey16.png", "rgba.png", "rotated.jpg", "truncated.jpg"}
    assert "garbage.png" in caplog.text and "tiny.png" in caplog.text and "too small" in caplog.text
    assert "truncated.jpg is truncated" in caplog.text  # trained on, but never silently
    rgba_pixels = open_rgb((tmp_path / "rgba.png").read_bytes())
    assert rgba_pixels.mode == "RGB" and rgba_pixels.getpixel((0, 0)) == (255, 255, 255)
    grey = open_rgb((tmp_path / "grey16.png").read_bytes())
    assert grey.mode == "RGB" and grey.getpixel((63, 0))[0] == 255 and grey.getpixel((0, 0))[0] == 0
    assert open_rgb((tmp_path / "rotated.jpg").read_bytes()).size == (64, 96)  # upright after EXIF rotation
    for sample in samples:
        tensor = to_tensor(open_rgb(sample.record.read_bytes()), sample.placement, flip=False)
        assert tensor.shape == (3, 64, 64) and tensor.min() >= -1 and tensor.max() <= 1


# ----------------------------------------------------------------------------- captions


def test_caption_shuffle_keeps_leading_tokens_and_all_tags():
    caption = "sks, dog, red collar, grass, sunny"
    seen = {augment_caption(caption, random.Random(i), shuffle=True, keep_tokens=1) for i in range(30)}
    assert len(seen) > 5
    for text in seen:
        tags = text.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(caption.split(", "))


def test_caption_dropout_rate():
    out = [augment_caption("a b", random.Random(i), dropout_rate=0.3) for i in range(2000)]
    assert 0.25 < out.count("") / len(out) < 0.35
    assert set(out) == {"", "a b"}


# ----------------------------------------------------------------------------- buckets


def test_buckets_respect_area_steps_and_limits():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 256 <= min(w, h) and max(w, h) <= 1024


def test_choose_bucket_by_aspect_and_without_upscaling():
    buckets = make_buckets(512, 256, 1024, 64)
    w, h = choose_bucket((1600, 900), buckets)
    assert abs(w / h - 16 / 9) < 0.15 and w > h
    assert choose_bucket((300, 200), buckets, no_upscale=True, step=64) == (256, 192)  # never larger than the image


def test_bucketed_samples_keep_aspect(tmp_path):
    _gradient(200, 100).save(tmp_path / "wide.png")
    _gradient(100, 200).save(tmp_path / "tall.png")
    samples = prepare_samples(find_records(instance_data_dir=str(tmp_path)), resolution=128, instance_prompt="x",
                              enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32)
    sizes = {s.record.path.name: s.bucket for s in samples}
    assert sizes["wide.png"][0] > sizes["wide.png"][1] and sizes["tall.png"][0] < sizes["tall.png"][1]


# ----------------------------------------------------------------------------- batch order


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_never_mix_buckets_and_cover_every_sample():
    buckets = [(64, 64)] * 5 + [(96, 32)] * 3
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1)
    batches = _take(sampler, sampler.batches_per_epoch)
    assert all(len({buckets[i] for i, _ in b}) == 1 for b in batches)
    assert {i for b in batches for i, _ in b} == set(range(8))
    assert all(len(b) == 2 for b in batches)  # short last batches are filled, never ragged


def test_process_slices_make_up_the_single_process_batches():
    buckets = [(64, 64)] * 7
    single = _take(BucketBatchSampler(buckets, batch_size=4, seed=3), 6)
    parts = [_take(BucketBatchSampler(buckets, batch_size=2, num_processes=2, process_index=p, seed=3), 6) for p in (0, 1)]
    assert [a + b for a, b in zip(*parts)] == single


def test_resume_starts_at_the_exact_next_batch_mid_epoch():
    buckets = [(64, 64)] * 10
    full = _take(BucketBatchSampler(buckets, batch_size=3, seed=0), 9)
    resumed = BucketBatchSampler(buckets, batch_size=3, seed=0)
    resumed.start = 5  # mid-epoch: 4 batches per epoch
    assert _take(resumed, 4) == full[5:9]


# ----------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def components(tiny_model):
    return load_components(str(tiny_model))


class _SingleProcess:
    process_index, num_processes, is_local_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def _samples(folder, **kwargs):
    return prepare_samples(find_records(instance_data_dir=str(folder)), resolution=64, **kwargs)


def test_cache_key_changes_with_everything_that_changes_the_latent(shapes_dir, components):
    sample = _samples(shapes_dir)[0]
    cache = LatentCache(fingerprint="vae-a", dtype=torch.float32, resolution=64)
    base = cache.key(sample, False)
    variants = [
        cache.key(dataclasses.replace(sample, image_hash="other"), False),
        cache.key(sample, True),
        cache.key(dataclasses.replace(sample, placement=dataclasses.replace(sample.placement, crop=(1, 0, 64, 64))), False),
        cache.key(dataclasses.replace(sample, placement=dataclasses.replace(sample.placement, resized=(80, 64))), False),
        LatentCache(fingerprint="vae-b", dtype=torch.float32, resolution=64).key(sample, False),
        LatentCache(fingerprint="vae-a", dtype=torch.float16, resolution=64).key(sample, False),
        LatentCache(fingerprint="vae-a", dtype=torch.float32, resolution=128).key(sample, False),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_cached_latents_stay_paired_with_their_image_and_caption(tmp_path, components):
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]):
        Image.new("RGB", (64, 64), color).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    samples = _samples(tmp_path)
    cache = LatentCache(fingerprint=components.fingerprint, dtype=torch.float32, resolution=64)
    cache.build(samples, (False, True), components.vae, _SingleProcess(), batch_size=3)
    dataset = TrainDataset(samples, latents=cache, random_flip=True, seed=0)
    sampler = BucketBatchSampler([s.bucket for s in samples], batch_size=2, seed=5)
    for batch in _take(sampler, 6):  # shuffled order, several epochs
        for index, epoch in batch:
            example = dataset[(index, epoch)]
            assert example["caption"] == f"caption {samples[index].record.path.stem}"
            flip = random.Random(f"0:{epoch}:{index}").random() < 0.5
            pixels = to_tensor(open_rgb(samples[index].record.read_bytes()), samples[index].placement, flip)
            with torch.no_grad():
                expected = components.vae.encode(pixels[None]).latent_dist.mean[0]
            torch.testing.assert_close(example["latent_mean"], expected, rtol=1e-4, atol=1e-5)


def test_flipped_latents_are_cached_separately(tmp_path, components):
    _gradient().save(tmp_path / "g.png")
    samples = _samples(tmp_path, instance_prompt="x")
    cache = LatentCache(fingerprint=components.fingerprint, dtype=torch.float32, resolution=64)
    cache.build(samples, (False, True), components.vae, _SingleProcess(), batch_size=2)
    plain, flipped = cache.get(samples[0], False)[0], cache.get(samples[0], True)[0]
    assert not torch.allclose(plain, flipped)


def test_disk_cache_is_reused_and_rebuilt_only_for_changed_images(tmp_path, shapes_dir, components, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cache_dir = tmp_path / "cache"

    def build():
        cache = LatentCache(fingerprint=components.fingerprint, dtype=torch.float32, resolution=64, cache_dir=cache_dir)
        encoded = []
        original = cache._encode
        monkeypatch.setattr(cache, "_encode", lambda keys, *a, **k: encoded.extend(keys) or original(keys, *a, **k))
        samples = _samples(data)
        cache.build(samples, (False,), components.vae, _SingleProcess(), batch_size=4)
        return cache, samples, encoded

    _, samples, first = build()
    assert len(first) == 8 and len(list(cache_dir.glob("*.safetensors"))) == 8
    _, _, second = build()
    assert second == []  # nothing re-encoded
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "0003.png")  # edit one image
    cache, samples, third = build()
    assert len(third) == 1
    edited = next(s for s in samples if s.record.path.name == "0003.png")
    with torch.no_grad():
        pixels = to_tensor(open_rgb(edited.record.read_bytes()), edited.placement, False)
        expected = components.vae.encode(pixels[None]).latent_dist.mean[0]
    torch.testing.assert_close(cache.get(edited, False)[0], expected, rtol=1e-4, atol=1e-5)
    assert not list(cache_dir.glob("*.tmp*"))  # atomic writes leave no partial files


def test_text_embedding_cache_encodes_each_caption_once():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"hidden": lengths[:, None].repeat(1, 2), "pooled": -lengths}  # e.g. SDXL's two outputs

    cache = TextEmbeddingCache(encode)
    cache.prefill(["a", "bb", "a"])
    out = cache(["bb", "a", "ccc", "ccc"])
    assert out["hidden"][:, 0].tolist() == [2.0, 1.0, 3.0, 3.0]
    assert out["pooled"].tolist() == [-2.0, -1.0, -3.0, -3.0]
    assert calls == [["a", "bb"], ["ccc"]]
    cache(["ccc", "a"])
    assert len(calls) == 2


def test_vae_out_of_memory_while_caching_suggests_a_smaller_batch(shapes_dir, components, monkeypatch):
    from sdtune.errors import SdtuneError

    def out_of_memory(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(components.vae, "encode", out_of_memory)
    cache = LatentCache(fingerprint="f", dtype=torch.float32, resolution=64)
    with pytest.raises(SdtuneError, match="ran out of memory caching 4 images at once; pass a smaller --vae_batch_size"):
        cache.build(_samples(shapes_dir), (False,), components.vae, _SingleProcess(), batch_size=4)


def test_a_latin1_caption_is_read_with_a_warning_not_replacement_characters(tmp_path, caplog):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a café in Zürich".encode("latin-1"))
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a naïve sketch", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        records = find_records(instance_data_dir=str(tmp_path))
    assert [r.caption for r in records] == ["a café in Zürich", "a naïve sketch"]
    assert "a.txt is not UTF-8; read it as Latin-1" in caplog.text and "b.txt" not in caplog.text


def test_a_hub_dataset_while_offline_is_one_line_that_says_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        find_records(dataset_name="someone/some-dataset")
    message = str(err.value)
    assert message.startswith("--dataset_name someone/some-dataset: could not load the dataset (HF_HUB_OFFLINE is set "
                              "(offline), so only local datasets load; ") and "\n" not in message
