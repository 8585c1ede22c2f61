"""What `sdtune eval` writes: the samples and their grid, the printed table, and the figures against the step."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw

from sdtune.evaluate import _FIGURE_COLUMNS, Measurement
from sdtune.sampling import make_grid

logger = logging.getLogger(__name__)


def write_measurement(measurement: Measurement, folder: Path, title: str, images: bool = True) -> None:
    """The samples (a PNG per image, with ``images``) and one grid: a row per kind, the judge's verdict under each
    toy sample."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for kind, samples in measurement.samples.items():
        stem = kind.replace(" ", "-")
        for i, image in enumerate(samples if images else []):
            image.save(folder / f"{stem}-{i:03d}.png")
        labels = measurement.labels.get(kind, [""] * len(samples))
        tiles.append([_tile(image, label) for image, label in zip(samples[:8], labels[:8])])
    if tiles:
        columns = max(len(row) for row in tiles)
        rows = [row + [Image.new("RGB", row[0].size, "white")] * (columns - len(row)) for row in tiles]
        grid = make_grid([tile for row in rows for tile in row], columns=columns)
        canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
        canvas.paste(grid, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), f"{title}: rows " + " / ".join(measurement.samples), fill="black")
        canvas.save(folder / "grid.png")


def _tile(image: Image.Image, label: str, side: int = 128) -> Image.Image:
    tile = Image.new("RGB", (side, side + (14 if label else 0)), "white")
    tile.paste(image.resize((side, side), Image.Resampling.NEAREST if image.width < side else Image.Resampling.LANCZOS))
    if label:
        ImageDraw.Draw(tile).text((2, side + 1), label[:22], fill="black")
    return tile


def print_table(rows: list[tuple[str, dict]]) -> None:
    columns = [c for c in _FIGURE_COLUMNS if any(c in row for _, row in rows)]
    print(f"{'':14}" + "".join(f"{c:>20}" for c in columns))
    for name, row in rows:
        print(f"{name:14}" + "".join(f"{row[c]:>20.4f}" if c in row else f"{'':>20}" for c in columns))


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per dict; the columns are every key, in the order they first appear (a missing value is empty)."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def pyplot(path: Path):
    """matplotlib's pyplot without a display, or None (logged) when the optional extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install 'sdtune[eval]'); the CSV has the numbers", path.name)
        return None
    return plt


def plot_by_step(rows: list[dict], path: Path) -> Path | None:
    """Each metric against the step (one panel per metric), so a user sees where fidelity peaks and drift begins."""
    plt = pyplot(path)
    if plt is None:
        return None
    names = [c for c in rows[0] if c != "step" and not c.endswith("_std")]
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    steps = [row["step"] for row in rows]
    for axis, name in zip(axes[0], names):
        axis.plot(steps, [row[name] for row in rows], marker="o")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
