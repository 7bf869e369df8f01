"""Captions to fixed-length token ids with a sentencepiece model.

Any `.model` file works (c4_en, Gemma, or the small one trained on the
synthetic captions in tokenizers/). EOS and padding follow big_vision: EOS is
appended, the sequence is cut to `length`, and with `sticky_eos` a cut
sequence still ends in EOS. An empty caption becomes just EOS, then padding.
SigLIP tokenizes lowercased text with sticky EOS and pads with 1 (c4_en's
EOS); SigLIP 2 the same with Gemma's pad id 0.
"""

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

from lit_navit import fs

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_tokenizer_path() -> str:
  """The tokenizer shipped for the synthetic source (tokenizers/synthetic.model)."""
  return os.path.join(_REPO_ROOT, 'tokenizers', 'synthetic.model')


class Tokenizer:
  """Encodes captions to int32 [N, length].

  Args:
    model_path: a sentencepiece .model file (local or gs://).
    length: tokens per caption (T).
    sticky_eos: if a caption is cut, its last kept token becomes EOS.
    add_eos: append EOS to every caption.
    pad_id: id for padding; default the model's pad id, else 0.
    lowercase: lowercase captions before encoding (big_vision's default).
  """

  def __init__(self, model_path: str, length: int, sticky_eos: bool = False,
               add_eos: bool = True, pad_id: int | None = None,
               lowercase: bool = False):
    if not fs.isfile(model_path):
      raise FileNotFoundError(f'sentencepiece model {model_path!r} does not exist')
    if length < 1:
      raise ValueError(f'tokenizer length must be >= 1, got {length}')
    # Read through lit_navit.fs: sentencepiece itself opens only local files.
    self._sp = spm.SentencePieceProcessor(model_proto=fs.read_bytes(model_path))
    self.length = length
    self.sticky_eos = sticky_eos
    self.add_eos = add_eos
    self.lowercase = lowercase
    model_pad = self._sp.pad_id()
    self.pad_id = pad_id if pad_id is not None else (model_pad if model_pad >= 0 else 0)

  @classmethod
  def from_config(cls, input_config) -> 'Tokenizer':
    """The tokenizer of an `input` config (data/pipeline.default_config)."""
    return cls(input_config.tokenizer, input_config.text_len,
               sticky_eos=input_config.sticky_eos,
               pad_id=input_config.get('pad_id'),
               lowercase=input_config.get('lowercase', False))

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    out = np.full((len(texts), self.length), self.pad_id, np.int32)
    texts = [(t or '').lower() if self.lowercase else (t or '') for t in texts]
    for row, ids in enumerate(self._sp.encode(texts)):
      if self.add_eos:
        ids = ids + [self.eos_id]
      if len(ids) > self.length:
        ids = ids[:self.length]
        if self.sticky_eos:
          ids[-1] = self.eos_id
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row of ids, padding and EOS dropped (for debugging)."""
    return self._sp.decode([int(i) for i in ids if i not in (self.pad_id, self.eos_id)])
