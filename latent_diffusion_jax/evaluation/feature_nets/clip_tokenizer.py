"""open_clip's caption tokenization with a transformers `CLIPTokenizer`, offline.

open_clip tokenizes with OpenAI's byte-pair vocabulary, which it ships in its package
(bpe_simple_vocab_16e6.txt.gz). `open_clip_tokenizer` turns that file into the vocab.json/merges.txt
pair a `CLIPTokenizer` reads (the construction OpenAI's `SimpleTokenizer` does in memory: the 256
byte symbols, the same with </w>, one token per merge, then <|startoftext|> and <|endoftext|>, 49408
in all); `ClipScorer.tokenize` pads with id 0, as `open_clip.tokenize` does. `clean_caption` applies open_clip's text
cleaning (ftfy when installed, HTML unescaping twice, whitespace collapsing, lowercase) first, so the
ids equal open_clip's, truncation included: [SOT] + the first 75 tokens + [EOT].
"""

import gzip
import html
import json
import os
import re
import tempfile
from typing import Optional

from latent_diffusion_jax.core.errors import MissingInputError
from latent_diffusion_jax.data.tokenizers import load_tokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (after its header).
_MERGES = 49152 - 256 - 2


def _byte_symbols():
  """The printable stand-in of each byte, in the order OpenAI's vocabulary lists them."""
  order = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
           + list(range(ord("\xae"), ord("\xff") + 1)))
  symbols = [chr(b) for b in order]
  extra = 0
  for b in range(256):
    if b not in order:
      symbols.append(chr(256 + extra))
      extra += 1
  return symbols


def write_open_clip_vocab(bpe_path: str, out_dir: str, context_length: int = 77) -> str:
  """Writes vocab.json, merges.txt and the tokenizer configs of open_clip's BPE file to `out_dir`."""
  if not os.path.isfile(bpe_path):
    raise MissingInputError(f"No BPE vocabulary at {bpe_path!r} (open_clip's bpe_simple_vocab_16e6.txt.gz).")
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:_MERGES + 1]
  symbols = _byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  # Padding is written as <|endoftext|>, not as "!" (id 0): a pad token is a special token, and
  # "!" in a caption would then be read as padding. Callers put open_clip's 0 where the attention
  # mask is zero (ClipScorer.tokenize); the pooled token is the first <|endoftext|> either way.
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
               "do_lower_case": True, **special}, f)
  return out_dir


def open_clip_tokenizer(bpe_path: str, context_length: int = 77):
  """A `CLIPTokenizer` with open_clip's vocabulary (padding with <|endoftext|>; see above)."""
  with tempfile.TemporaryDirectory() as tmp:
    return load_tokenizer(write_open_clip_vocab(bpe_path, tmp, context_length))


def clean_caption(text: str) -> str:
  """open_clip's default cleaning: ftfy (if installed), HTML unescape twice, whitespace, lowercase."""
  try:
    import ftfy  # open_clip's own dependency; optional here
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


def find_tokenizer_dir(directory: str) -> Optional[str]:
  """`directory` or its tokenizer/ subfolder if it holds CLIP tokenizer files, else None."""
  for candidate in (directory, os.path.join(directory, "tokenizer")):
    if os.path.isfile(os.path.join(candidate, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(candidate, n)) for n in ("vocab.json", "merges.txt")):
      return candidate
  return None
