"""Errors that the command line reports as one line, naming the problem and the fix."""


class LightningDiffError(Exception):
    """Base of errors caused by the user's input (config, files); the CLI prints them as one line."""


class ConfigError(LightningDiffError, ValueError):
    """A config value is wrong or missing."""


class DataError(LightningDiffError, ValueError):
    """A data file or dataset is missing or has the wrong shape or type."""


class CheckpointError(LightningDiffError):
    """A checkpoint is missing, corrupt, or not from lightning_diff."""


class EndOfTrainingError(LightningDiffError):
    """Training finished and its checkpoint is saved, but an end-of-training callback failed."""
