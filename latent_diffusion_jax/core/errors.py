"""The one family of errors a user can act on: bad input, or a run stopped for a stated reason.

Every message names the config key, file or flag at fault and what would be valid. The command
lines (train.py, sample.py, the cli/ modules) catch `UserError` alone and exit non-zero with its
message and no traceback; any other exception is a bug or an environment fault and keeps its
traceback. Each class also derives from the built-in type it refines, so `except ValueError`
(or FileNotFoundError, OSError) in callers keeps working.
"""


class UserError(Exception):
  """Base of the family: the message alone says what to change."""


class UserInputError(UserError, ValueError):
  """A config key, flag, argument or input with an invalid value (names it and what is valid)."""


class FlagError(UserInputError):
  """Command-line flags that contradict each other or miss a required one (names the flags)."""


class InputFileError(UserInputError):
  """A file or directory that exists but is not what was asked for: a damaged checkpoint,
  weights that do not fit the model, a pickle that was not allowed, an unreadable dataset."""


class MissingInputError(UserError, FileNotFoundError):
  """A path given by the user that does not exist."""


class StorageError(UserError, OSError):
  """Output that cannot be written: a full disk, an unwritable or vanished directory."""


class RunHalted(UserError, FloatingPointError):
  """Training stopped on purpose (a non-finite loss with nonfinite_policy=halt)."""
