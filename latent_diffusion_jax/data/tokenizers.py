"""CLIP tokenizers from local directories, a whole-word CLIP tokenizer for small caption
vocabularies, and strict batch tokenization (no silent truncation, no silent unknown words).

A word tokenizer for the shapes dataset:

  path = build_word_tokenizer(shapes.vocabulary(), f"{workdir}/tokenizer")
  ids = tokenize(load_tokenizer(path), ["a red circle in the top left"], max_length=16)
  # [[bos, a, red, circle, in, the, top, left, eos, eos, ...]]: one id per word
"""

import json
import os
import re
import shutil
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import transformers
from latent_diffusion_jax.core.errors import UserInputError, MissingInputError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# tokenizer_config.json key (read back through `tokenizer.init_kwargs`) holding the number of
# whole-word tokens of a `build_word_tokenizer` vocabulary, ids 0 .. count - 1. Its merge pieces
# are tokens too ("n</w>" from "i" + "n</w>"), so unknown words rarely map to the unknown token;
# `tokenize` instead insists that every id is a whole word.
_WHOLE_WORD_COUNT_KEY = "whole_word_count"
_WORD_PATTERN = re.compile(r"[a-z]+")


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a CLIP tokenizer from a local directory, never from the network.

  Args:
    path: a directory holding vocab.json and merges.txt (or tokenizer.json), such as the
      "tokenizer" folder of a Stable Diffusion checkpoint or the output of
      `build_word_tokenizer`.

  Returns:
    A `transformers.CLIPTokenizer`.

  Raises:
    FileNotFoundError: `path` is not a directory with tokenizer files.
  """
  path = os.fspath(path)
  has_files = os.path.isfile(os.path.join(path, "tokenizer.json")) or all(
      os.path.isfile(os.path.join(path, name)) for name in ("vocab.json", "merges.txt"))
  if not has_files:
    raise MissingInputError(
        f"No CLIP tokenizer at {path!r}: expected a directory with vocab.json and merges.txt "
        "(or tokenizer.json). Build one with build_word_tokenizer() or copy the 'tokenizer' "
        "folder of a checkpoint there; nothing is downloaded.")
  return transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)


def build_word_tokenizer(words: Iterable[str], out_dir: str, model_max_length: int = 77) -> str:
  """Writes a CLIP tokenizer that maps each of `words` to a single whole-word token.

  The vocabulary holds the words as "word</w>" tokens (ids 0.. in the given order), then the
  character pieces their byte-pair merges pass through (a BPE model must contain every merge's
  parts and result), then <|startoftext|> and <|endoftext|> last, as in CLIP, so that the end
  token has the largest id. <|endoftext|> doubles as the padding and unknown token. The number
  of words is recorded in tokenizer_config.json, so that `tokenize` rejects any other word even
  where merge pieces happen to spell it.

  Args:
    words: lowercase ASCII words, e.g. `shapes.vocabulary()`; duplicates are ignored.
    out_dir: directory to write vocab.json, merges.txt, tokenizer_config.json and
      special_tokens_map.json into (created if missing).
    model_max_length: the sequence length recorded in tokenizer_config.json.

  Returns:
    `out_dir`, ready for `load_tokenizer`.

  Raises:
    ValueError: a word is not made of the letters a-z, or `words` is empty.
  """
  words = list(dict.fromkeys(words))
  if not words:
    raise UserInputError("build_word_tokenizer needs at least one word")
  bad = [w for w in words if not _WORD_PATTERN.fullmatch(w)]
  if bad:
    raise UserInputError(f"Words must consist of the letters a-z only, got {bad}")

  merges = _whole_word_merges(words)
  vocab: Dict[str, int] = {}
  for token in [w + END_OF_WORD for w in words] + [t for m in merges for t in (*m, "".join(m))]:
    vocab.setdefault(token, len(vocab))
  for token in (BOS, EOS):
    vocab[token] = len(vocab)

  os.makedirs(out_dir, exist_ok=True)
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
            "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
            _WHOLE_WORD_COUNT_KEY: len(words), **special}
  _write_json(os.path.join(out_dir, "vocab.json"), vocab)
  _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
  _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    # CLIP's merges files start with a version line, which readers skip.
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return out_dir


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, prompts: Sequence[str],
             max_length: int) -> np.ndarray:
  """Tokenizes prompts with start and end tokens, padded with the pad token to `max_length`.

  Args:
    tokenizer: a CLIP tokenizer, e.g. from `load_tokenizer`.
    prompts: the texts, one per row.
    max_length: the number of token ids per row, start and end tokens included.

  Returns:
    int32 array [len(prompts), max_length].

  Raises:
    ValueError: a prompt needs more than `max_length` tokens (nothing is truncated), contains a
      word the tokenizer maps to its unknown token, or, for a `build_word_tokenizer` tokenizer,
      contains a word that is not one whole-word token.
    TypeError: `prompts` is a single string rather than a sequence of strings.
  """
  if isinstance(prompts, str):
    raise TypeError("tokenize expects a sequence of prompts, got a single string")
  if tokenizer.pad_token_id is None:
    raise UserInputError("The tokenizer has no pad token to pad prompts with")
  rows = np.full((len(prompts), max_length), tokenizer.pad_token_id, np.int32)
  if not prompts:
    return rows
  encoded = tokenizer(list(prompts), add_special_tokens=True, padding=False,
                      truncation=False)["input_ids"]
  for row, (prompt, ids) in enumerate(zip(prompts, encoded)):
    _check_words(tokenizer, prompt, _content(tokenizer, ids))
    if len(ids) > max_length:
      raise UserInputError(
          f"Prompt {prompt!r} has {len(ids)} tokens (start and end tokens included), more than "
          f"max_length={max_length}")
    rows[row, :len(ids)] = ids
  return rows


def _whole_word_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
  """Merges, in rank order, under which byte-pair encoding turns each word into one token.

  Each round appends, for every word still split, the merge of its first two pieces. A new merge
  ranks last, so it only acts where no earlier merge applies and never splits a finished word;
  every round shortens each unfinished word, so the loop ends.
  """
  merges: List[Tuple[str, str]] = []
  ranks: Dict[Tuple[str, str], int] = {}
  unfinished = True
  while unfinished:
    unfinished = False
    for word in words:
      pieces = _byte_pair_encode(word, ranks)
      if len(pieces) > 1:
        ranks[(pieces[0], pieces[1])] = len(merges)
        merges.append((pieces[0], pieces[1]))
        unfinished = True
  return merges


def _byte_pair_encode(word: str, ranks: Dict[Tuple[str, str], int]) -> List[str]:
  """CLIP's BPE of one lowercase word: apply the best-ranked adjacent merge until none is left."""
  pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
  while len(pieces) > 1:
    pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
    rank, i = min(pairs)
    if rank == len(ranks):
      break
    pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
  return pieces


def _content(tokenizer, ids: List[int]) -> List[int]:
  """`ids` without the start and end tokens the tokenizer added."""
  start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
  end = len(ids) - 1 if len(ids) > start and ids[-1] == tokenizer.eos_token_id else len(ids)
  return ids[start:end]


def _check_words(tokenizer, prompt: str, content: List[int]) -> None:
  """Raises if `content`, the ids of `prompt`, holds an unknown or (word tokenizers) a piece."""
  whole_words = tokenizer.init_kwargs.get(_WHOLE_WORD_COUNT_KEY)

  def known(ids: List[int]) -> bool:
    if whole_words is not None:
      return all(0 <= i < whole_words for i in ids)
    return tokenizer.unk_token_id not in ids

  if known(content):
    return
  bad = [word for word in prompt.split()
         if not known(tokenizer(word, add_special_tokens=False)["input_ids"])]
  raise UserInputError(
      f"Prompt {prompt!r} contains words outside the tokenizer's vocabulary: "
      f"{bad or 'punctuation or special tokens'}")


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")


def prepare_run_tokenizer(config, workdir: str) -> str:
  """Copies or builds the tokenizer into `<workdir>/tokenizer` so the run is self-contained."""
  dest = os.path.join(workdir, "tokenizer")
  if os.path.isdir(dest):
    return dest
  source = config.frozen.tokenizer
  # Written under a private name and renamed: a run killed half-way, or several processes sharing
  # the workdir, never leave a partial tokenizer under the name later runs trust.
  tmp = f"{dest}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  if source:
    if not os.path.isdir(source):
      raise MissingInputError(f"frozen.tokenizer={source!r} is not a directory with a CLIP tokenizer.")
    load_tokenizer(source)  # fails early, naming the path, if it is not a tokenizer
    shutil.copytree(source, tmp)
  else:
    from latent_diffusion_jax.data import shapes
    words = shapes.vocabulary()
    if config.data.get("shapes_variant", "single") == "layout":  # "a red circle and a ..."
      words += ("and",)  # last, so every other word keeps its id
    build_word_tokenizer(words, tmp,
                                    model_max_length=config.model.text_encoder.max_length)
  try:
    os.rename(tmp, dest)
  except OSError:  # another process renamed its identical copy first
    if not os.path.isdir(dest):
      raise
    shutil.rmtree(tmp, ignore_errors=True)
  return dest
