r"""Exports a trained model for PyTorch users, or converts between export formats.

  python -m latent_diffusion_jax.export --checkpoint workdirs/shapes_ldm --format diffusers \
      --out exports/shapes_diffusers
  python -m latent_diffusion_jax.export --checkpoint workdirs/shapes_ldm --step 20000 --noema \
      --format single-file --out exports/shapes.safetensors --dtype float16
  python -m latent_diffusion_jax.export --from_single_file sd15.safetensors --format native \
      --out exports/sd15_native

Sources (exactly one): --checkpoint (our training workdir), --from_diffusers, --from_single_file,
--from_native. Formats: diffusers (a StableDiffusionPipeline directory), single-file (original
Stable Diffusion keys + the inference yaml beside it), native (our layout; holds any model).
Pickle files (.ckpt/.bin) are refused unless --allow_pickle is given. docs/PYTORCH.md has more.
"""

import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app, flags

FORMATS = ("diffusers", "single-file", "native")
DTYPES = ("float32", "float16", "bfloat16")
SCHEDULERS = ("ddim", "ddpm", "dpmpp_2m")


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: this module is importable from the package, and flags in the global
  # FLAGS would clash with sample.py's (--checkpoint, --step, --out, ...) in any process that
  # imports both; a fresh set per parse also keeps repeated in-process runs independent.
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "Training workdir holding our checkpoints.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_boolean("ema", True, "Export the EMA parameters (--noema: the raw ones).",
                       flag_values=fv)
  flags.DEFINE_string("from_diffusers", None, "Source: a diffusers pipeline directory.",
                      flag_values=fv)
  flags.DEFINE_string("from_single_file", None,
                      "Source: an original-layout checkpoint (.safetensors; .ckpt needs "
                      "--allow_pickle).", flag_values=fv)
  flags.DEFINE_string("from_native", None, "Source: a directory written with --format native.",
                      flag_values=fv)
  flags.DEFINE_string("config_yaml", None, "With --from_single_file: its inference yaml "
                      "(default: <stem>.yaml beside the file).", flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "With --from_single_file: a local CLIP tokenizer "
                      "directory (default: <stem>_tokenizer/ beside the file).", flag_values=fv)
  flags.DEFINE_boolean("allow_pickle", False, "Accept pickle weight files (.ckpt/.bin); loading "
                       "them can run code stored in the file.", flag_values=fv)
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


def load_source(*, checkpoint: Optional[str] = None, step: Optional[int] = None,
                ema: bool = True, from_diffusers: Optional[str] = None,
                from_single_file: Optional[str] = None, from_native: Optional[str] = None,
                config_yaml: Optional[str] = None, tokenizer: Optional[str] = None,
                allow_pickle: bool = False) -> Tuple[Any, str]:
  """Loads the bundle from exactly one source.

  Returns:
    (ModelBundle, a one-line description of the source).

  Raises:
    ValueError / FileNotFoundError: no or several sources, or a source that does not exist; the
      message names the flags.
  """
  sources = {"--checkpoint": checkpoint, "--from_diffusers": from_diffusers,
             "--from_single_file": from_single_file, "--from_native": from_native}
  given = [name for name, value in sources.items() if value is not None]
  if len(given) != 1:
    raise ValueError(f"Give exactly one source: {', '.join(sources)}; got "
                     f"{', '.join(given) if given else 'none'}.")
  if (config_yaml is not None or tokenizer is not None) and from_single_file is None:
    raise ValueError("--config_yaml and --tokenizer only apply to --from_single_file.")
  if checkpoint is not None:
    if not os.path.isdir(checkpoint):
      raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such training workdir.")
    from latent_diffusion_jax.training.inference_loading import load_bundle_from_workdir
    bundle = load_bundle_from_workdir(checkpoint, step=step, use_ema=ema)
    return bundle, f"checkpoint {checkpoint} (step {bundle.metadata.get('step', step)}, ema={ema})"
  if from_diffusers is not None:
    from latent_diffusion_jax.interop.diffusers import load_pipeline
    return load_pipeline(from_diffusers, allow_pickle=allow_pickle), f"diffusers {from_diffusers}"
  if from_single_file is not None:
    if not os.path.isfile(from_single_file):
      raise FileNotFoundError(f"--from_single_file {from_single_file!r}: no such file.")
    from latent_diffusion_jax.interop.single_file import load_single_file
    bundle = load_single_file(from_single_file, config_yaml=config_yaml, allow_pickle=allow_pickle,
                              tokenizer_path=tokenizer)
    return bundle, f"single file {from_single_file}"
  from latent_diffusion_jax.interop.native import load_native
  return load_native(from_native), f"native {from_native}"


def export_bundle(bundle: Any, fmt: str, out: str, *, dtype: Optional[str] = None,
                  scheduler: str = "ddim", text_layout: str = "auto") -> Dict[str, str]:
  """Writes `bundle` in format `fmt` ("diffusers", "single-file" or "native") to `out`.

  Returns:
    What was written: name -> path.
  """
  if fmt == "diffusers":
    from latent_diffusion_jax.interop.export_diffusers import export_diffusers
    return export_diffusers(bundle, out, dtype=dtype or "float32", scheduler=scheduler)
  if fmt == "single-file":
    if not out.endswith(".safetensors"):
      raise ValueError(f"--format single-file writes one file: --out must end in .safetensors, "
                       f"got {out!r}.")
    from latent_diffusion_jax.interop.single_file import export_single_file
    return export_single_file(bundle, out, dtype=dtype or "float32", text_layout=text_layout)
  if fmt == "native":
    from latent_diffusion_jax.interop.native import export_native
    return export_native(bundle, out, dtype=dtype)
  raise ValueError(f"Unknown format {fmt!r}; valid: {', '.join(FORMATS)}.")


def run(argv: Sequence[str], print_fn=print) -> Dict[str, str]:
  """Parses command-line arguments (argv[0] is the program name) and exports.

  Raises:
    app.UsageError: bad or missing flags, a missing source, a refused pickle, or a model the
      format cannot hold; the message says what to do instead.
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
  from latent_diffusion_jax.interop.convert import WeightImportError
  try:
    bundle, source = load_source(
        checkpoint=fv.checkpoint, step=fv.step, ema=fv.ema, from_diffusers=fv.from_diffusers,
        from_single_file=fv.from_single_file, from_native=fv.from_native,
        config_yaml=fv.config_yaml, tokenizer=fv.tokenizer, allow_pickle=fv.allow_pickle)
    print_fn(f"Loaded {source}.")
    written = export_bundle(bundle, fv.format, fv.out, dtype=fv.dtype, scheduler=fv.scheduler,
                            text_layout=fv.text_layout)
  except (ValueError, FileNotFoundError, WeightImportError) as e:
    raise app.UsageError(str(e)) from None
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


def main(argv):
  run(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
