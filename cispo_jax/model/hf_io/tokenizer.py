"""The tokenizer of a Hugging Face directory, checked against the model: a vocabulary file, an eos token
(the sampler stops on it) and pad / bos ids inside the model's vocabulary. Local files only, no remote code."""

from __future__ import annotations

import glob
import logging
import os

from cispo_jax.model.hf_io.config import _read_json

# Files that hold a tokenizer's vocabulary (without one, transformers builds an empty tokenizer).
_TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "*.tiktoken")
log = logging.getLogger(__name__)


def _check_tokenizer_files(path: str) -> None:
  """Without a vocabulary file, AutoTokenizer quietly builds a tokenizer that encodes every text
  to zero tokens; name what is missing instead."""
  found = {p for pat in _TOKENIZER_VOCAB for p in glob.glob(os.path.join(path, pat))}
  if os.path.join(path, "vocab.json") in found and not os.path.isfile(os.path.join(path, "merges.txt")) \
      and os.path.join(path, "tokenizer.json") not in found:
    raise FileNotFoundError(f"{path}: tokenizer file merges.txt is missing (vocab.json is there, and a BPE "
                            "tokenizer needs both, or a tokenizer.json)")
  if not found:
    present = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"{path}: no tokenizer vocabulary file: none of tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
        f"vocab.txt, spiece.model, *.tiktoken is there (files present: {present}); copy the checkpoint's "
        "tokenizer files into this directory")


def _sets_token(path: str, key: str) -> bool:
  """Whether the directory's tokenizer files themselves name the special token `key` (e.g. eos_token)."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    try:
      if _read_json(os.path.join(path, name)).get(key):
        return True
    except (FileNotFoundError, ValueError):
      pass
  return False


_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, vocab_size: int | None = None):
  """The directory's tokenizer via AutoTokenizer: local files only, never remote code.

  Checked here, so a bad directory fails at load naming its cause: a vocabulary file must
  exist; the tokenizer must have an eos token (the sampler's stop token) whose id, like the
  pad and bos ids, is below the model's `vocab_size` (default: config.json's, when there is
  one). A tokenizer without a pad token (or whose pad is a default transformers filled in that
  the vocabulary lacks) gets eos as its pad, logged: padded positions are masked, only the id
  must be valid. More tokens than vocab_size is only a warning: a prompt that holds such a
  token is refused when it is encoded (data.check_prompts, sampling.encode_prompts / generate).
  """
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory")
  _check_tokenizer_files(path)
  try:
    # A plain tokenizer.json (tokenizer_class TokenizersBackend, as our tiny models save) is loaded as
    # written: AutoTokenizer would swap in the config's model-type class (Qwen2Tokenizer), whose
    # byte-level pre-tokenizer silently drops the spaces and newlines of a character vocabulary.
    cls = AutoTokenizer
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if (os.path.isfile(tok_cfg) and os.path.isfile(os.path.join(path, "tokenizer.json"))
        and _read_json(tok_cfg).get("tokenizer_class") in _PLAIN_TOKENIZERS):
      from transformers import PreTrainedTokenizerFast as cls
    tok = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except Exception as e:  # noqa: BLE001 -- re-raised with the directory named
    raise ValueError(f"{path}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from e
  if tok.eos_token_id is None:
    raise ValueError(f"{path}: the tokenizer has no eos_token (neither tokenizer_config.json nor "
                     "special_tokens_map.json sets one); the sampler stops on it: set \"eos_token\" in "
                     f"{os.path.join(path, 'tokenizer_config.json')} to the model's end-of-text token")
  if vocab_size is None and os.path.isfile(os.path.join(path, "config.json")):
    vocab_size = _read_json(os.path.join(path, "config.json")).get("vocab_size")
    vocab_size = vocab_size if isinstance(vocab_size, int) else None  # a bad one: load_config says so
  _check_special_ids(tok, path, vocab_size)
  return tok


def _check_special_ids(tok, path: str, vocab_size: int | None):
  """eos, pad and bos ids inside the model's vocabulary (a missing pad becomes eos, logged)."""
  if vocab_size is not None:
    if tok.eos_token_id >= vocab_size:
      default = ("" if _sets_token(path, "eos_token") else
                 f"; the tokenizer files set no eos_token, so transformers filled in the default of "
                 f"{type(tok).__name__}, which the vocabulary lacks")
      raise ValueError(f"{path}: the tokenizer has no eos token in the model's vocabulary: eos_token "
                       f"{tok.eos_token!r} has id {tok.eos_token_id} >= vocab_size={vocab_size} (config.json)"
                       f"{default}. Set \"eos_token\" in tokenizer_config.json to the model's end-of-text token")
  pad_id = tok.pad_token_id
  if pad_id is None or (vocab_size is not None and pad_id >= vocab_size and not _sets_token(path, "pad_token")):
    why = ("has no pad_token" if pad_id is None else
           f"files set no pad_token, and transformers' default {tok.pad_token!r} of {type(tok).__name__} is not in "
           f"the model's vocabulary (id {pad_id} >= vocab_size={vocab_size})")
    log.warning("%s: the tokenizer %s; using its eos_token %r (id %d) as pad (padded positions are masked out)",
                path, why, tok.eos_token, tok.eos_token_id)
    tok.pad_token = tok.eos_token
  if vocab_size is not None:
    if tok.pad_token_id >= vocab_size:
      raise ValueError(f"{path}: the tokenizer's pad_token {tok.pad_token!r} has id {tok.pad_token_id} >= the "
                       f"model's vocab_size={vocab_size} (config.json): the tokenizer does not match the model. "
                       "Set \"pad_token\" in tokenizer_config.json to a token of the vocabulary")
    bos = tok.bos_token_id
    if bos is not None and bos >= vocab_size and bos in tok("a")["input_ids"]:  # only if prompts get it
      raise ValueError(f"{path}: the tokenizer starts every text with bos_token {tok.bos_token!r}, id {bos} >= "
                       f"the model's vocab_size={vocab_size} (config.json): the tokenizer does not match the "
                       "model. Set \"bos_token\" in tokenizer_config.json to a token of the vocabulary")
    if len(tok) > vocab_size:
      extra = tok.convert_ids_to_tokens(list(range(vocab_size, min(len(tok), vocab_size + 5))))
      log.warning("%s: the tokenizer has %d tokens but the model's vocab_size is %d: ids >= %d (%s%s) have no "
                  "embedding row; a prompt that holds one is refused when it is encoded", path, len(tok),
                  vocab_size, vocab_size, extra, " ..." if len(tok) > vocab_size + 5 else "")
