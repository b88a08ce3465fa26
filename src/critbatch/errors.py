"""One exception family for expected failures.

Anything raised as a :class:`CritbatchError` is a mistake in the input (a value out of range, a
missing file, a run directory from another config) rather than a bug. The CLI prints it as one line
and exits with status 2; library callers can catch the family.
"""


class CritbatchError(Exception):
    """An expected failure with a one-line message naming the value and what is accepted."""


class ConfigError(CritbatchError):
    """A configuration value is invalid or inconsistent."""


class DataError(CritbatchError):
    """A data directory is missing, corrupt or too small for the request."""


class CheckpointError(CritbatchError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""
