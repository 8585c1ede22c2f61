"""Conditioning images (ControlNet): each training image's control map, from a folder or a dataset column.

Layouts:

- a folder: ``--conditioning_data_dir`` holds one control map per training image, under the same
  relative path and file stem (any image extension), as kohya's ControlNet trainer reads them:
  ``images/cat/01.jpg`` pairs with ``conditioning/cat/01.png``;
- a `datasets` dataset (``--dataset_name`` or a folder with metadata.jsonl): the
  ``--conditioning_image_column`` column, as diffusers' ``train_controlnet.py`` reads it. In a
  metadata.jsonl the column holds file names relative to the folder.

A control map is placed exactly as its image (same resize, crop and flip) and scaled to [0, 1],
the range ControlNet pipelines feed the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.data.images import IMAGE_EXTENSIONS, Placement, placed
from sdtune.data.sources import ImageRecord
from sdtune.errors import DataError


def attach_control_images(records: list[ImageRecord], *, image_folder: str, conditioning_data_dir: str | None,
                          conditioning_image_column: str) -> list[ImageRecord]:
    """``records`` with each one's control map attached (``record.conditioning``).

    ``image_folder`` is where the records were found: the image folder, or the dataset's name or folder.

    Raises:
        DataError: an image has no control map, or the dataset lacks the column; one line naming it.
    """
    if not records:
        return records
    if records[0].dataset is not None:
        return _from_dataset(records, conditioning_image_column, image_folder)
    if not conditioning_data_dir:
        raise DataError("ControlNet training needs a control map per image: pass --conditioning_data_dir FOLDER "
                        "(same file names as the images), or a dataset with --conditioning_image_column")
    return _from_folder(records, Path(image_folder), Path(conditioning_data_dir))


def _from_folder(records: list[ImageRecord], image_folder: Path, control_folder: Path) -> list[ImageRecord]:
    if not control_folder.is_dir():
        raise DataError(f"--conditioning_data_dir {control_folder}: no such folder")
    by_stem = {}
    for path in control_folder.rglob("*"):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            by_stem.setdefault(path.relative_to(control_folder).with_suffix(""), path)
    attached, missing = [], []
    for record in records:
        stem = record.path.relative_to(image_folder).with_suffix("")
        control = by_stem.get(stem)
        if control is None:
            missing.append((record.name, control_folder / stem))
            continue
        attached.append(dataclasses.replace(record, conditioning=ImageRecord(name=str(control), caption=None, path=control)))
    if missing:
        (name, expected), = missing[:1]
        raise DataError(f"{len(missing)} image(s) have no control map in --conditioning_data_dir {control_folder} "
                        f"(first: {name}; expected {expected}.png or another image extension)")
    return attached


def _from_dataset(records: list[ImageRecord], column: str, image_folder: str) -> list[ImageRecord]:
    import datasets

    dataset = records[0].dataset
    if column not in dataset.column_names:
        raise DataError(f"the dataset has no column '{column}' (columns: {', '.join(dataset.column_names)}); "
                        "set --conditioning_image_column")
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
        return [dataclasses.replace(r, dataset=dataset, conditioning=dataclasses.replace(
            r, name=f"{r.name}:{column}", caption=None, dataset=dataset, image_column=column)) for r in records]
    # metadata.jsonl: file names relative to the folder the dataset was loaded from
    folder = Path(image_folder)
    attached = []
    for record in records:
        value = dataset[record.row][column]
        if not isinstance(value, str) or not (folder / value).is_file():
            raise DataError(f"{record.name}: its '{column}' value {value!r} is not an image file in {folder}; "
                            "metadata.jsonl needs the control map's file name there")
        attached.append(dataclasses.replace(record, conditioning=ImageRecord(
            name=str(folder / value), caption=None, path=folder / value)))
    return attached


def check_control_size(image: Image.Image, control: Image.Image, image_name: str, control_name: str) -> None:
    """A control map must have its image's size: a map of another size would steer the wrong pixels.

    Raises:
        DataError: the sizes differ.
    """
    if image.size != control.size:
        raise DataError(f"{control_name} is {control.size[0]}x{control.size[1]} but its image {image_name} is "
                        f"{image.size[0]}x{image.size[1]}; a control map must have its image's size")


def control_tensor(control: Image.Image, placement: Placement, flip: bool) -> torch.Tensor:
    """The control map placed like its image, in [0, 1] (what ControlNet pipelines feed). [3, H, W] float32"""
    # bilinear, not Lanczos: Lanczos rings around the hard edges control maps are made of
    array = np.asarray(placed(control, placement, flip, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
