"""Tests for the whole-word CLIP tokenizer, local loading and strict tokenization."""

import json
import shutil

import numpy as np
import pytest

from latent_diffusion_jax.data import shapes
from latent_diffusion_jax.data import tokenizers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tokenizers.build_word_tokenizer(shapes.vocabulary(), str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return tokenizers.load_tokenizer(tokenizer_dir)


def test_written_vocabulary_has_whole_words_and_clip_specials(tokenizer_dir):
  with open(f"{tokenizer_dir}/vocab.json") as f:
    vocab = json.load(f)
  words = shapes.vocabulary()
  assert [vocab[w + "</w>"] for w in words] == list(range(len(words)))
  assert vocab["<|endoftext|>"] == max(vocab.values())
  assert vocab["<|startoftext|>"] == max(vocab.values()) - 1
  with open(f"{tokenizer_dir}/merges.txt") as f:
    assert f.readline().startswith("#version")


def test_caption_tokenizes_to_start_one_id_per_word_end_and_padding(tokenizer):
  ids = tokenizers.tokenize(tokenizer, ["a red circle in the top left"], max_length=12)
  words = shapes.vocabulary()
  word_ids = [words.index(w) for w in "a red circle in the top left".split()]
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  assert tokenizer.pad_token_id == eos
  assert ids.dtype == np.int32 and ids.shape == (1, 12)
  assert ids[0].tolist() == [bos, *word_ids, eos] + [eos] * 3
  assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a red circle in the top left"


def test_every_dataset_caption_is_one_token_per_word(tokenizer):
  _, captions, _ = shapes.generate_batch(0, 40, split="train", include_size=True)
  ids = tokenizers.tokenize(tokenizer, captions, max_length=16)
  for caption, row in zip(captions, ids):
    assert int(np.sum(row != tokenizer.eos_token_id)) == len(caption.split()) + 1
  assert tokenizers.tokenize(tokenizer, ["A  LARGE Red circle"], 8)[0, 1:5].tolist() == [
      shapes.vocabulary().index(w) for w in ("a", "large", "red", "circle")]


def test_too_long_prompt_raises_with_its_token_count(tokenizer):
  with pytest.raises(ValueError, match=r"'a red circle in the top left' has 9 tokens"):
    tokenizers.tokenize(tokenizer, ["a red", "a red circle in the top left"], max_length=8)


@pytest.mark.parametrize("prompt, word", [
    ("a purple circle", "purple"),
    ("a bored circle", "bored"),  # Spelled by merge pieces ("bo" + "red</w>"), still unknown.
    ("a red circle.", "circle."),
])
def test_unknown_word_raises_naming_it(tokenizer, prompt, word):
  with pytest.raises(ValueError, match=f"'{word}'"):
    tokenizers.tokenize(tokenizer, [prompt], max_length=16)


def test_unknown_token_is_rejected_for_tokenizers_without_a_word_list(tokenizer_dir, tmp_path):
  # A plain CLIP tokenizer (no whole-word count) is checked through its unknown token only.
  plain = shutil.copytree(tokenizer_dir, tmp_path / "plain")
  config_path = plain / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  del config["whole_word_count"]
  config_path.write_text(json.dumps(config))
  tokenizer = tokenizers.load_tokenizer(str(plain))
  assert tokenizers.tokenize(tokenizer, ["a red square"], 6).shape == (1, 6)
  with pytest.raises(ValueError, match="'xylophone'"):
    tokenizers.tokenize(tokenizer, ["a red xylophone"], 16)


def test_missing_directory_and_bad_inputs_raise(tmp_path, tokenizer):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tokenizers.load_tokenizer(missing)
  with pytest.raises(ValueError, match="a-z"):
    tokenizers.build_word_tokenizer(["red", "top-left"], str(tmp_path / "bad"))
  with pytest.raises(TypeError):
    tokenizers.tokenize(tokenizer, "a red circle", 8)
