"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class SdtuneError(Exception):
    """A mistake in the input (option, file, data) with one sentence on how to fix it."""


class ConfigError(SdtuneError):
    """A bad option, recipe key or option value."""


class DataError(SdtuneError):
    """A dataset that cannot be used: missing folder, no usable image, unreadable file."""


class ModelLoadError(SdtuneError):
    """A base model that cannot be found or read."""


class TrainingDiverged(SdtuneError):
    """The loss became NaN or infinite."""


class ExportFailed(SdtuneError):
    """Training finished but writing its outputs failed; the trained weights are kept in a checkpoint."""
