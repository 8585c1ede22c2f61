"""Caption text and caption files: cleanup, then storage beside the images or in metadata.jsonl.

Tidying: whitespace, stutters ("a dog dog dog"), echoed prompts, prefix/suffix. Storing: a
caption file beside each image (kohya) or metadata.jsonl (HF imagefolder), written so that a
killed run resumes and several processes never write the same file. No model here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath

from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.errors import DataError

METADATA = "metadata.jsonl"
CAPTION_COLUMN = "text"  # the default --caption_column: what training reads back from metadata.jsonl
PARTS_DIR = ".sdtune-caption-parts"  # per-process jsonl parts, merged into metadata.jsonl at the end of a run

_EDGE_PUNCTUATION = ",;:.!?-"
_TRAILING = ",;:-"  # a caption may end in "." or "!" but not in a dangling comma


def clean_caption(text: str, prompt: str | None = None) -> str:
    """Tidy a generated caption.

    Collapses whitespace, collapses immediately repeated words or phrases ("a dog dog dog" →
    "a dog", "a cat, a cat, a cat" → "a cat"), drops the conditioning prompt when the model
    echoed it at the start ("a photo of a dog" with prompt "a photo of" → "a dog"), and strips
    dangling punctuation.

    Args:
        text: The decoded model output.
        prompt: The conditioning prompt given to the model, if any.

    Returns:
        The cleaned caption; empty when nothing but the prompt or punctuation was generated.
    """
    words = collapse_repeats(text.split())
    caption = " ".join(words)
    if prompt and prompt.strip():
        caption = _drop_prefix(caption, " ".join(prompt.split()))
        caption = " ".join(collapse_repeats(caption.split()))
    return caption.strip().lstrip(_EDGE_PUNCTUATION).rstrip(_TRAILING).strip()


def collapse_repeats(words: list[str]) -> list[str]:
    """Remove immediately repeated words and phrases, keeping the last copy (and so its punctuation).

    Words compare case-insensitively and ignoring punctuation at their ends, so "Dog, dog." is a
    repeat. Quadratic in the caption length, which is a few dozen words.
    """
    words = list(words)
    keys = [_key(w) for w in words]
    changed = True
    while changed:
        changed = False
        for start in range(len(words)):
            for size in range(1, (len(words) - start) // 2 + 1):
                if keys[start:start + size] == keys[start + size:start + 2 * size] and any(keys[start:start + size]):
                    del words[start:start + size], keys[start:start + size]
                    changed = True
                    break
            if changed:
                break
    return words


def add_prefix_suffix(caption: str, prefix: str = "", suffix: str = "") -> str:
    """Join ``prefix + caption + suffix`` with a space where one is needed.

    A space follows the prefix unless it ends with one; a space precedes the suffix unless it
    starts with whitespace or punctuation (", high quality" attaches directly).
    """
    if prefix and caption and not prefix[-1].isspace():
        prefix += " "
    if suffix and caption and not (suffix[0].isspace() or suffix[0] in _EDGE_PUNCTUATION):
        suffix = " " + suffix
    return f"{prefix}{caption}{suffix}".strip()


def _key(word: str) -> str:
    return word.strip(_EDGE_PUNCTUATION + "\"'()").lower()


def _drop_prefix(caption: str, prompt: str) -> str:
    if not caption.lower().startswith(prompt.lower()):
        return caption
    rest = caption[len(prompt):]
    if rest and rest[0].isalnum() and prompt[-1].isalnum():  # "a photo of" must not eat "a photo offers"
        return caption
    return rest.lstrip(_EDGE_PUNCTUATION + " ")


# ---------------------------------------------------------------------------------------------
# Where captions live: a caption file beside each image (kohya) or metadata.jsonl (HF imagefolder)


def find_images(folder: Path) -> list[Path]:
    """The images under ``folder``, sorted (every process lists them in the same order)."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and PARTS_DIR not in p.parts)


def image_name(folder: Path, path: Path) -> str:
    """An image's name in metadata.jsonl and in messages: its path relative to ``folder``, with ``/``."""
    return path.relative_to(folder).as_posix()


def caption_files(folder: Path, images: list[Path], caption_extension: str) -> dict[str, str]:
    """The non-empty captions in caption files beside ``images``, by image name."""
    captions = {}
    for image in images:
        path = image.with_suffix(caption_extension)
        text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
        if text:
            captions[image_name(folder, image)] = text
    return captions


def jsonl_captioned(folder: Path) -> set[str]:
    """Names of images with a non-empty caption in metadata.jsonl or in the parts of an interrupted run.

    Raises:
        DataError: a line of metadata.jsonl is not JSON or has no ``file_name``.
    """
    return {e["file_name"] for e in _jsonl_entries(folder) if str(e.get(CAPTION_COLUMN) or "").strip()}


def write_captions(folder: Path, captions: list[tuple[Path, str]], *, output_format: str, caption_extension: str = ".txt",
                   part: int = 0) -> None:
    """Store captions: each in its caption file (written atomically), or appended to jsonl part ``part``.

    Each process appends to its own part, so appends never interleave; `merge_jsonl_parts`
    folds the parts into metadata.jsonl once every process is done.
    """
    if output_format == "txt":
        for path, caption in captions:
            _write_atomic(path.with_suffix(caption_extension), caption + "\n")
        return
    if not captions:
        return
    path = folder / PARTS_DIR / f"part-{part}.jsonl"
    path.parent.mkdir(exist_ok=True)
    data = "".join(json.dumps({"file_name": image_name(folder, p), CAPTION_COLUMN: c}, ensure_ascii=False) + "\n"
                   for p, c in captions).encode("utf-8")
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                data = b"\n" + data  # a line cut short by a killed run stays on its own (skipped) line
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # once per batch: a kill loses at most the batch being written


def merge_jsonl_parts(folder: Path) -> None:
    """Fold the parts into metadata.jsonl (atomically; the newest caption of a file wins), then delete them."""
    parts = _part_files(folder)
    if not parts:
        _remove_if_empty(folder / PARTS_DIR)
        return
    merged: dict[str, dict] = {}
    for entry in _jsonl_entries(folder):
        merged[entry["file_name"]] = {**merged.get(entry["file_name"], {}), **entry}  # other columns survive
    _write_atomic(folder / METADATA, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in merged.values()))
    for part in parts:  # a kill before this point leaves parts that merge to the same result next time
        part.unlink()
    _remove_if_empty(folder / PARTS_DIR)


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or still holding another process's files
        directory.rmdir()


def _jsonl_entries(folder: Path) -> list[dict]:
    # metadata.jsonl first, then parts oldest first, so that the newest caption of a file comes last
    metadata = folder / METADATA
    entries = _read_jsonl(metadata, strict=True) if metadata.is_file() else []
    for part in _part_files(folder):
        entries += _read_jsonl(part, strict=False)
    return entries


def _read_jsonl(path: Path, *, strict: bool) -> list[dict]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            if strict:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg}); fix or delete the line") from None
            continue  # a part line cut short when a run was killed mid-write
        if isinstance(entry, dict) and "file_name" in entry:
            entries.append({**entry, "file_name": PurePosixPath(str(entry["file_name"])).as_posix()})
        elif entry is not None and strict:
            raise DataError(f"{path} line {number}: missing 'file_name' (each line needs file_name and a caption)")
    return entries


def _part_files(folder: Path) -> list[Path]:
    return sorted((folder / PARTS_DIR).glob("part-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # readers see the old file or the new one, never half of one
