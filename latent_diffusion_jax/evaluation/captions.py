"""Captions to evaluate on: a text file (one per line) or a COCO captions JSON.

  captions = read_captions("captions_val2014.json", 30000)   # a fixed subset of 30k
  captions = read_captions("prompts.txt", 1000)              # repeated in order when too few

COCO files (`annotations[].caption`, e.g. captions_val2014.json) are sorted by annotation id and
subsampled with a fixed seed, as MLPerf's fixed 30k-caption list is a fixed random subset; text
files keep their order. Asking for more captions than there are repeats them cyclically.
"""

import json
import os
from typing import List, Optional

import numpy as np
from absl import logging

from latent_diffusion_jax.core.errors import InputFileError, MissingInputError, UserInputError

SUBSET_SEED = 2014


def read_caption_file(path: str) -> List[str]:
  """All captions of `path`, in file order (COCO: by annotation id)."""
  if not path or not os.path.isfile(path):
    raise MissingInputError(f"captions file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      data = json.loads(text)
      annotations = sorted(data["annotations"], key=lambda a: a.get("id", 0))
      captions = [" ".join(str(a["caption"]).split()) for a in annotations]
    except (ValueError, KeyError, TypeError) as error:
      raise InputFileError(f"{path}: expected a COCO captions JSON with annotations[].caption "
                           f"({error})") from error
  else:
    captions = [line.strip() for line in text.splitlines()]
    captions = [c for c in captions if c and not c.startswith("#")]
  if not captions:
    raise InputFileError(f"captions file {path} holds no caption")
  return captions


def select(captions: List[str], count: int, shuffle: bool) -> List[str]:
  """`count` captions: a seeded subset when `shuffle` (else the first ones), cycled when too few."""
  if count < 1:
    raise UserInputError(f"the number of images must be >= 1, got {count}")
  order = (np.random.default_rng(SUBSET_SEED).permutation(len(captions)) if shuffle
           else np.arange(len(captions)))
  if count > len(captions):
    logging.info("%d captions for %d images: each caption used about %.1f times.",
                 len(captions), count, count / len(captions))
  return [captions[order[i % len(captions)]] for i in range(count)]


def read_captions(path: str, count: Optional[int] = None) -> List[str]:
  """`count` captions from `path` (all when None); see the module docstring."""
  captions = read_caption_file(path)
  if count is None:
    return captions
  return select(captions, count, shuffle=path.endswith(".json"))
