"""Console logging that shows our progress lines and hides libraries' routine chatter."""

import logging as py_logging

from absl import logging

# Libraries that log every checkpoint file and dataset shard at INFO; their warnings still show.
_CHATTY = ("orbax", "tensorflow_datasets", "etils", "xla_bridge", "replica_slices")


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(c in record.pathname for c in _CHATTY)


def quiet_libraries() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  logging.set_verbosity(logging.INFO)
