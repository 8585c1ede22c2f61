"""Finding training images and their captions: kohya folders, metadata.jsonl, `datasets` datasets."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One training image before decoding: where its bytes come from, and its caption (if any)."""

    name: str  # shown in messages: a file path, or dataset[row]
    caption: str | None
    loss_weight: float = 1.0
    path: Path | None = None
    dataset: Any = None  # a `datasets.Dataset` whose image column is undecoded ({"bytes", "path"})
    row: int = -1
    image_column: str = "image"
    conditioning: ImageRecord | None = None  # ControlNet: the control map of this image (see data.control_images)

    def read_bytes(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        value = self.dataset[self.row][self.image_column]
        if value.get("bytes") is not None:
            return value["bytes"]
        return Path(value["path"]).read_bytes()


def find_records(
    *,
    instance_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    caption_extension: str = ".txt",
) -> list[ImageRecord]:
    """List the images of a folder (captions in .txt files or metadata.jsonl) or of a `datasets` dataset.

    Raises:
        DataError: no source given, the folder does not exist, or the dataset lacks the columns.
    """
    if dataset_name:
        return _records_from_dataset(dataset_name, dataset_config_name, image_column, caption_column, option="--dataset_name")
    if not instance_data_dir:
        raise DataError("no training data: pass --instance_data_dir FOLDER or --dataset_name NAME")
    folder = Path(instance_data_dir)
    if not folder.is_dir():
        raise DataError(f"--instance_data_dir {folder}: no such folder")
    if (folder / "metadata.jsonl").is_file():
        return _records_from_dataset(str(folder), None, image_column, caption_column, option="--instance_data_dir")
    return _records_from_folder(folder, caption_extension)


def _records_from_folder(folder: Path, caption_extension: str) -> list[ImageRecord]:
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = path.with_suffix(caption_extension)
        caption = read_caption(caption_file) if caption_file.is_file() else None
        records.append(ImageRecord(name=str(path), caption=caption or None, path=path))
    return records


def read_caption(path: Path) -> str:
    """A caption file as UTF-8; a file in another encoding (Windows editors save Latin-1/cp1252) is read as
    Latin-1, which maps every byte to a character, with a warning instead of silent replacement characters."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = data.decode("latin-1").strip()
        logger.warning("%s is not UTF-8; read it as Latin-1 (%r); save it as UTF-8 to be sure", path, text[:60])
        return text


def _records_from_dataset(name: str, config_name, image_column: str, caption_column: str, option: str) -> list[ImageRecord]:
    import datasets  # deferred: importing `datasets` costs ~1 s and a folder of .txt captions does not need it

    try:
        if Path(name).is_dir() and (Path(name) / "metadata.jsonl").is_file():
            _check_metadata_jsonl(Path(name) / "metadata.jsonl")
            dataset = datasets.load_dataset("imagefolder", data_dir=name, split="train")
        else:
            dataset = datasets.load_dataset(name, config_name, split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as err:  # OSError: not found, no network
        from sdtune.preflight import hub_offline

        offline = "HF_HUB_OFFLINE is set (offline), so only local datasets load; " if hub_offline() else ""
        if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ is not None:
            err = err.__cause__  # what went wrong, e.g. an image in the folder without a metadata.jsonl line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{option} {name}: could not load the dataset ({offline}{first_line})") from None
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise DataError(
                f"{option} {name} has no column '{column}' (columns: {', '.join(dataset.column_names)}); set {flag}"
            )
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    captions = dataset[caption_column]
    return [
        ImageRecord(name=f"{name}[{row}]", caption=(str(c).strip() or None) if c is not None else None,
                    dataset=dataset, row=row, image_column=image_column)
        for row, c in enumerate(captions)
    ]


def _check_metadata_jsonl(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        if "file_name" not in entry:
            raise DataError(f"{path} line {number}: missing 'file_name' (each line needs file_name and a caption)")
