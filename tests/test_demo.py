"""`sdtune demo`, the README's first command, end to end with few steps."""

from PIL import Image

from sdtune.toy.demo import run_demo


def test_demo_trains_exports_and_writes_the_before_after_grid(tmp_path):
    result = run_demo(tmp_path / "demo", max_train_steps=4)
    assert result.global_step == 4 and result.outputs["diffusers"].is_file() and result.outputs["kohya"].is_file()
    assert Image.open(tmp_path / "demo" / "before_after.png").size == (4 * 64, 2 * 64)  # base row, LoRA row
