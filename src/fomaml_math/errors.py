"""The one error a user can cause: a setting or input file that is missing or invalid.

Its own module, so that every layer (configuration, data, stages) raises it without importing
the configuration machinery.
"""


class ConfigError(ValueError):
    """A configuration value or input file is missing or invalid; the message is one line naming it."""
