"""The flags that name a weight source, the same in every command (sample, export, evaluate).

  --model PATH              any source; its kind is detected (artifacts/loader.py)
  --checkpoint WORKDIR      our training workdir        (--step N, --noema)
  --diffusers DIR           a diffusers pipeline directory
  --single_file FILE        an original-layout checkpoint (--config_yaml, --tokenizer)
  --native DIR              a directory written by `export --format native`
  --allow_pickle            accept pickle weight files (they can run code)
"""

import dataclasses

from absl import flags

from latent_diffusion_jax.artifacts.loader import Source, detect_kind
from latent_diffusion_jax.core.errors import FlagError, UserError, UserInputError

# flag name -> the source kind it names ("auto": detected from the path).
SOURCE_FLAGS = {"model": "auto", "checkpoint": "workdir", "diffusers": "diffusers",
                "single_file": "single_file", "native": "native"}


def define(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the source flags in `fv`."""
  flags.DEFINE_string("model", None, "Any weight source: a training workdir, a diffusers pipeline, "
                      "a single-file checkpoint or a native export (detected).", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "A training workdir holding our checkpoints.",
                      flag_values=fv)
  flags.DEFINE_string("diffusers", None, "A diffusers pipeline directory.", flag_values=fv)
  flags.DEFINE_string("single_file", None, "An original-layout Stable Diffusion checkpoint "
                      "(.safetensors; .ckpt needs --allow_pickle).", flag_values=fv)
  flags.DEFINE_string("native", None, "A directory written by export --format native.",
                      flag_values=fv)
  flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: the latest).",
                       flag_values=fv)
  flags.DEFINE_boolean("ema", True, "Workdir: use the EMA parameters (--noema: the raw ones).",
                       flag_values=fv)
  flags.DEFINE_string("config_yaml", None, "Single file: its inference yaml (default: <stem>.yaml "
                      "beside it, then the file's header).", flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "A tokenizer directory for a source without one "
                      "(single file default: <stem>_tokenizer/ beside it).", flag_values=fv)
  flags.DEFINE_boolean("allow_pickle", False, "Accept pickle weight files (.ckpt/.bin); loading "
                       "them can run code stored in the file.", flag_values=fv)


def source_from_flags(fv: flags.FlagValues = flags.FLAGS) -> Source:
  """The `Source` the parsed flags name, with its kind resolved.

  Raises:
    FlagError: no source flag or several, or options that do not fit the source (e.g. --step
      with --diffusers); the message names the flags.
    MissingInputError, UserInputError: a path that does not exist or that holds nothing this
      package reads; the message names the flag and the path.
  """
  given = [(name, fv[name].value) for name in SOURCE_FLAGS if fv[name].value is not None]
  if len(given) != 1:
    names = ", ".join(f"--{n}" for n in SOURCE_FLAGS)
    got = ", ".join(f"--{n}" for n, _ in given) or "none"
    raise FlagError(f"Give the model with exactly one of {names}; got {got}.")
  name, path = given[0]
  source = Source(path, kind=SOURCE_FLAGS[name], step=fv["step"].value, ema=fv["ema"].value,
                  config_yaml=fv["config_yaml"].value, tokenizer=fv["tokenizer"].value,
                  allow_pickle=fv["allow_pickle"].value)
  if source.kind == "auto":
    try:
      source = dataclasses.replace(source, kind=detect_kind(path))
    except UserError as e:
      raise type(e)(f"--{name} {path}: {e}") from None
  try:
    return source.resolved()
  except UserInputError as e:
    raise FlagError(f"--{name} {path}: {e}") from None
