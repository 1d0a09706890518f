"""User-facing errors: the CLI prints their one-line message and exits with code 2."""


class MegadsError(Exception):
    """An error caused by the user's input (config, data, checkpoint, sizes). Exit code 2."""

    exit_code = 2


class ConfigError(MegadsError):
    """A bad config key, value or combination."""


class DataError(MegadsError):
    """Malformed, empty or mismatched data."""


class CheckpointError(MegadsError):
    """A missing or corrupt checkpoint."""
