"""Progress lines with rate and ETA for the long loops of an evaluation (generation, extraction)."""

import time
from typing import Optional

from absl import logging


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """`update(done)` logs "<what>: done/total images, rate, ETA" at most every `every` seconds.

  `start` images already done (a resumed run) do not count towards the rate.
  """

  def __init__(self, what: str, total: int, start: int = 0, every: float = 10.0):
    self.what, self.total, self.start, self.every = what, total, start, every
    self.t0 = time.perf_counter()
    self.last: Optional[float] = None

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if self.last is not None and now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = (done - self.start) / max(now - self.t0, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    logging.info("%s: %d/%d images, %.2f images/s, ETA %s", self.what, done, self.total, rate,
                 format_seconds(eta) if eta != float("inf") else "?")
