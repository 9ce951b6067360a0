"""User-facing errors: the CLI prints these as one clear message (no traceback) and exits 2."""


class AdgenError(Exception):
    """An error the user can fix. The message says what is wrong, where, and how to fix it."""


class DataError(AdgenError):
    """A problem in an input data file (names the file and line)."""


class ModelError(AdgenError):
    """A model spec that cannot be resolved or loaded."""


class ConfigError(AdgenError):
    """A bad config file or override."""
