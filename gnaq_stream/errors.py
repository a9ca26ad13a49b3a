"""Errors a user can cause and fix; the CLI prints them without a traceback and exits non-zero."""


class GnaqError(Exception):
    """Base class for every user-facing error."""


class DatasetError(GnaqError):
    """A dataset is unknown, missing or malformed."""


class CheckpointError(GnaqError):
    """A checkpoint directory is missing, corrupt or incompatible."""


class ConfigError(GnaqError):
    """A setting is outside what the system supports."""
