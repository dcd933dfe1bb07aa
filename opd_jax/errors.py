"""The errors a user can fix: a config, a data file, a checkpoint, a run directory.

Each is raised with one line that names the culprit (the field, file, tensor or row) and, where it helps, what to
do. The CLI prints that line (and the hint) and exits with code 2; the traceback appears only with `--debug`.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, not with opd_jax. `hint` (optional) says what to do about it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError, ValueError):
    """A config file, override or sweep that does not fit the schema, or values that cannot work together."""


class DataError(UserError, RuntimeError):
    """The data cannot produce examples (every row bad, no rows, fewer rows than processes, a prompt too long)."""


class RunDirError(UserError, FileExistsError):
    """A run directory that cannot be used as asked (exists without resume/overwrite, or resume without a
    checkpoint)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model file that cannot be read (truncated, corrupt, or missing its parts)."""


__all__ = ["UserError", "ConfigError", "DataError", "RunDirError", "CheckpointError"]
