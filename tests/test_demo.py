"""`sdtune demo --quick` end to end through the CLI: each method must learn its concept (slow)."""

import json

import pytest

from sdtune.cli import main
from sdtune.toy.demo import METHODS


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output_dir", str(output)]) == 0
    return output, json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_short_finetune_teaches_the_concept_that_the_base_lacks(quick_demo, method):
    output, metrics = quick_demo
    figures, base = metrics[method], metrics["base"][f"concept_{metrics[method]['concept']}"]
    assert base["subject_fidelity"] <= 0.15  # the base cannot draw the held-out concept ...
    assert figures["subject_fidelity"] >= base["subject_fidelity"] + 0.5, figures  # ... a short fine-tune can
    assert (output / f"{method}.png").is_file()


@pytest.mark.slow
def test_prior_preservation_stops_class_prompts_turning_into_the_subject(quick_demo):
    _, metrics = quick_demo
    kept, overwritten = metrics["dreambooth"], metrics["dreambooth_no_prior"]
    # measured with 96 samples: drift 0% with prior preservation, 48% without
    assert overwritten["prior_drift"] >= kept["prior_drift"] + 0.15, (kept, overwritten)


@pytest.mark.slow
def test_textual_inversion_leaves_every_prompt_without_the_token_unchanged(quick_demo):
    _, metrics = quick_demo
    assert metrics["textual_inversion"]["prior_preservation"] == 1.0  # same seeds, frozen model: the same images
