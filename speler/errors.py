"""The few exception types SpeLER raises for bad input and failed operations.

Every message says what went wrong, the value, where (file, sample, field) and what was expected.
The CLI turns a SpelerError into one line on stderr and exit code 2; the app into ``st.error``.
"""

from __future__ import annotations


class SpelerError(Exception):
    """Base class of every error SpeLER raises on purpose."""


class DataFormatError(SpelerError, ValueError):
    """A file or array does not follow its format or the SequenceSet contract."""


class LabelError(SpelerError, ValueError):
    """A label refers to an unknown sample or class, or is otherwise invalid."""


class StoreError(SpelerError):
    """The SQLite label store cannot be opened, migrated or written."""


class CheckpointError(SpelerError, ValueError):
    """A checkpoint is unreadable or belongs to another dataset, class list or layout."""


class ConfigError(SpelerError, ValueError):
    """A configuration key is unknown or a value has the wrong type or range."""


class ProjectError(SpelerError):
    """An annotation project is missing, incomplete, or already exists."""


class CancelledError(SpelerError):
    """Long work was cancelled by the user between steps."""


class AccessError(SpelerError):
    """A path is outside the folders this server is configured to read from."""
