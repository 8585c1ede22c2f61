"""sdtune: fine-tune Stable Diffusion with LoRA, DreamBooth and textual inversion.

    from sdtune import LoRAConfig, train_lora
    result = train_lora(LoRAConfig(pretrained_model_name_or_path="...", instance_data_dir="dog/",
                                   instance_prompt="a photo of sks dog", output_dir="out"))

Names are imported on first use, so `sdtune --help` does not pay for importing torch and diffusers.
"""

import importlib
import logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' "`XImageProcessor` requires torchvision; falling back to `XImageProcessorPil`".

    sdtune runs without torchvision on purpose (PIL and torch do its transforms), and the PIL
    image processors are the ones it wants. Where optional packages such as `kernels` are
    installed, importing diffusers' pipelines looks up CLIP's and SigLIP's image processors, and
    the notice then appeared at every `import sdtune.api`. (The CLI lowers transformers'
    verbosity altogether; this is for the Python API.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())

_EXPORTS = {
    "Components": "sdtune.models",
    "ControlNetConfig": "sdtune.config",
    "ControlNetMethod": "sdtune.methods.controlnet",
    "DreamBoothConfig": "sdtune.config",
    "DreamBoothMethod": "sdtune.methods.dreambooth",
    "EvalConfig": "sdtune.command_configs",
    "LoRAConfig": "sdtune.config",
    "LoRAMethod": "sdtune.methods.lora",
    "SdtuneError": "sdtune.errors",
    "SweepConfig": "sdtune.sweep",
    "TextualInversionConfig": "sdtune.config",
    "TextualInversionMethod": "sdtune.methods.textual_inversion",
    "TrainConfig": "sdtune.config",
    "TrainResult": "sdtune.loop",
    "evaluate": "sdtune.api",
    "load_components": "sdtune.models",
    "run_sweep": "sdtune.sweep",
    "train": "sdtune.loop",
    "train_controlnet": "sdtune.api",
    "train_dreambooth": "sdtune.api",
    "train_lora": "sdtune.api",
    "train_textual_inversion": "sdtune.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdtune' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
