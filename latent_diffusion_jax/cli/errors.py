"""How the command lines end on a user error: the message, a non-zero exit, no traceback."""

import functools
import sys
from typing import Callable

from latent_diffusion_jax.core.errors import UserError


def exits_on_user_error(program: str) -> Callable[[Callable], Callable]:
  """Decorates a `main(argv)`: a `UserError` ends the process with `program: Type: message` and
  exit status 1; every other exception propagates with its traceback."""

  def decorate(main: Callable) -> Callable:
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except UserError as e:
        sys.exit(f"{program}: {type(e).__name__}: {e}")
    return wrapped

  return decorate
