"""User-facing errors.

Anything a user or their data can cause raises :class:`CocomixError` (or a subclass)
with a message that says what is wrong and what to pass instead. The CLI prints such
errors as one red line and exits with status 2; everything else is a bug and keeps
its traceback.
"""


class CocomixError(Exception):
    """An error caused by the user's input, data or environment (not a bug)."""


class ConfigError(CocomixError, ValueError):
    """A config field holds a value that cannot work; the message names the field."""


class IntegrityError(CocomixError):
    """Stored data is corrupt, incomplete or does not match what it claims to be."""


class MismatchError(CocomixError):
    """Two inputs that must agree (tokenizer, teacher, SAE, output folder) do not."""
