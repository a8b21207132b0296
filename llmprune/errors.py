"""The package's base error for bad settings: a leaf every part may raise.

Each part keeps its own error classes beside its code (``CalibrationError``, ``ModelLoadError``, ...);
the ones about settings derive from :class:`ConfigError`, so the CLI answers them all with one line and
exit 2.
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""
