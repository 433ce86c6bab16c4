"""User-facing errors: each names the file or setting at fault, and the CLI prints it without a traceback."""


class SoupbenchError(Exception):
    """A problem with the user's input (config, data, checkpoints), not a bug in soupbench."""


class ConfigError(SoupbenchError):
    """A setting is missing, unknown or inconsistent."""


class DataError(SoupbenchError):
    """A dataset folder or file is missing, incomplete or malformed."""


class CheckpointError(SoupbenchError):
    """A weights file is missing, truncated, corrupt, non-finite or incompatible."""
