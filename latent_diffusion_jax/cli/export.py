r"""Exports a trained model for PyTorch users, or converts between export formats.

  python -m latent_diffusion_jax.cli.export --checkpoint workdirs/shapes_ldm --format diffusers \
      --out exports/shapes_diffusers
  python -m latent_diffusion_jax.cli.export --checkpoint workdirs/shapes_ldm --step 20000 --noema \
      --format single-file --out exports/shapes.safetensors --dtype float16
  python -m latent_diffusion_jax.cli.export --model sd15.safetensors --format native \
      --out exports/sd15_native

Sources (exactly one, the same flags as sample.py's): --model (any source, detected),
--checkpoint (our training workdir), --diffusers, --single_file, --native. Formats: diffusers (a StableDiffusionPipeline directory), single-file (original
Stable Diffusion keys + the inference yaml beside it), native (our layout; holds any model).
Pickle files (.ckpt/.bin) are refused unless --allow_pickle is given. docs/PYTORCH.md has more.
"""

import sys
from typing import Any, Dict, Optional, Sequence

from absl import app, flags

from latent_diffusion_jax.artifacts import loader
from latent_diffusion_jax.cli import errors, source_flags
from latent_diffusion_jax.core.errors import FlagError, UserInputError

FORMATS = ("diffusers", "single-file", "native")
DTYPES = ("float32", "float16", "bfloat16")
SCHEDULERS = ("ddim", "ddpm", "dpmpp_2m")


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: this module is importable from the package, and flags in the global
  # FLAGS would clash with sample.py's in any process that imports both; a fresh set per parse
  # also keeps repeated in-process runs independent.
  fv = flags.FlagValues()
  source_flags.define(fv)
  flags.DEFINE_enum("format", None, list(FORMATS), "What to write.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (diffusers, native) or .safetensors file "
                      "(single-file).", flag_values=fv)
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Weight dtype of the export (default: float32; "
                    "native keeps the parameters' dtype).", flag_values=fv)
  flags.DEFINE_enum("scheduler", "ddim", list(SCHEDULERS),
                    "diffusers: the scheduler class written to scheduler/.", flag_values=fv)
  flags.DEFINE_enum("text_layout", "auto", ["auto", "clip", "open_clip"],
                    "single-file: text encoder keys of SD 1.x (clip) or SD 2.x (open_clip); auto "
                    "picks by the encoder's activation.", flag_values=fv)
  return fv


def export_bundle(bundle: Any, fmt: str, out: str, *, dtype: Optional[str] = None,
                  scheduler: str = "ddim", text_layout: str = "auto") -> Dict[str, str]:
  """Writes `bundle` in format `fmt` ("diffusers", "single-file" or "native") to `out`.

  Returns:
    What was written: name -> path.
  """
  if fmt == "diffusers":
    if getattr(bundle, "conditioner", None) is not None:  # class labels: diffusers components
      from latent_diffusion_jax.interop.export_class_diffusers import export_class_conditional
      return export_class_conditional(bundle, out, dtype=dtype or "float32", scheduler=scheduler)
    from latent_diffusion_jax.interop.export_diffusers import export_diffusers
    return export_diffusers(bundle, out, dtype=dtype or "float32", scheduler=scheduler)
  if fmt == "single-file":
    if not out.endswith(".safetensors"):
      raise UserInputError(f"--format single-file writes one file: --out must end in .safetensors, "
                       f"got {out!r}.")
    from latent_diffusion_jax.interop.single_file import export_single_file
    return export_single_file(bundle, out, dtype=dtype or "float32", text_layout=text_layout)
  if fmt == "native":
    from latent_diffusion_jax.interop.native import export_native
    return export_native(bundle, out, dtype=dtype)
  raise UserInputError(f"Unknown format {fmt!r}; valid: {', '.join(FORMATS)}.")


def run(argv: Sequence[str], print_fn=print) -> Dict[str, str]:
  """Parses command-line arguments (argv[0] is the program name) and exports.

  Raises:
    app.UsageError: bad or missing flags.
    UserError: a missing or unreadable source, a refused pickle, or a model the format cannot
      hold; the message says what to do instead.
  """
  fv = _define_flags()
  try:
    rest = fv(list(argv))
  except flags.Error as e:
    raise app.UsageError(str(e)) from None
  if len(rest) > 1:
    raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
  if fv.format is None or fv.out is None:
    raise app.UsageError(f"--format ({'|'.join(FORMATS)}) and --out are required.")
  try:
    source = source_flags.source_from_flags(fv)
  except FlagError as e:
    raise app.UsageError(str(e)) from None
  bundle = loader.load_bundle(source)
  source = bundle.metadata["source"]
  print_fn(f"Loaded {source}.")
  written = export_bundle(bundle, fv.format, fv.out, dtype=fv.dtype, scheduler=fv.scheduler,
                          text_layout=fv.text_layout)
  print_fn(f"Wrote {fv.format} export of {source}:")
  for name, path in written.items():
    print_fn(f"  {name}: {path}")
  return written


def _parse(argv):
  """absl flags_parser: `run` parses our flags; absl's global ones keep their defaults."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(__doc__)
    print(_define_flags().get_help())
    sys.exit(0)
  app.parse_flags_with_usage(list(argv[:1]))
  return list(argv)


@errors.exits_on_user_error("export")
def main(argv):
  run(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
