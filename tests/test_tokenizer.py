"""Tokenizer: the shipped sentencepiece model, EOS, padding, truncation
(plain and sticky EOS), and tokenizers/train_sentencepiece.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_navit.data import synthetic
from lit_navit.data.text import Tokenizer, default_tokenizer_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, 'tokenizers', 'train_sentencepiece.py')
LONG = 'a photo of a large orange triangle on the left'


@pytest.fixture(scope='module')
def processor():
  """The shipped model through sentencepiece itself, as the reference."""
  return spm.SentencePieceProcessor(model_file=default_tokenizer_path())


def test_shipped_model_loads_with_big_vision_ids():
  """tokenizers/synthetic.model exists and has pad 0, eos 1 (c4_en's ids)."""
  path = default_tokenizer_path()
  assert path == os.path.join(REPO, 'tokenizers', 'synthetic.model')
  tokenizer = Tokenizer(path, length=16)
  assert tokenizer.pad_id == 0 and tokenizer.eos_id == 1
  assert 32 <= tokenizer.vocab_size <= 512


def test_encode_shape_dtype_eos_and_padding(processor):
  """[N, T] int32; each row is the caption's ids, then EOS, then pad_id."""
  captions = ['a red circle', 'a blue square at the top', 'ring']
  out = Tokenizer(default_tokenizer_path(), length=16).encode(captions)
  assert out.shape == (3, 16) and out.dtype == np.int32
  for row, caption in zip(out, captions):
    ids = processor.encode(caption)
    assert 0 < len(ids) < 15
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert row[len(ids)] == 1  # EOS.
    assert np.all(row[len(ids) + 1:] == 0)  # Padding.


def test_custom_pad_id_and_no_eos(processor):
  """pad_id overrides the model's pad; add_eos=False appends nothing."""
  ids = processor.encode('a red circle')
  padded = Tokenizer(default_tokenizer_path(), length=12, pad_id=-1)
  row = padded.encode(['a red circle'])[0]
  np.testing.assert_array_equal(row, ids + [1] + [-1] * (11 - len(ids)))
  bare = Tokenizer(default_tokenizer_path(), length=12, add_eos=False)
  row = bare.encode(['a red circle'])[0]
  np.testing.assert_array_equal(row, ids + [0] * (12 - len(ids)))
  assert np.all(bare.encode([''])[0] == 0)


def test_truncation_plain_and_sticky(processor):
  """A caption longer than T is cut to T: plainly, its first T ids (no EOS);
  with sticky_eos, its first T-1 ids then EOS."""
  ids = processor.encode(LONG)
  length = 6
  assert len(ids) + 1 > length
  plain = Tokenizer(default_tokenizer_path(), length).encode([LONG])[0]
  np.testing.assert_array_equal(plain, ids[:length])
  assert plain[-1] != 1
  sticky = Tokenizer(default_tokenizer_path(), length,
                     sticky_eos=True).encode([LONG])[0]
  np.testing.assert_array_equal(sticky, ids[:length - 1] + [1])


def test_exact_fit_is_not_cut(processor):
  """A caption whose ids plus EOS fill T exactly ends in its own EOS, with
  or without sticky_eos, and loses no token."""
  ids = processor.encode(LONG)
  for sticky in (False, True):
    row = Tokenizer(default_tokenizer_path(), len(ids) + 1,
                    sticky_eos=sticky).encode([LONG])[0]
    np.testing.assert_array_equal(row, ids + [1])


def test_empty_caption_is_eos_then_padding():
  """'' (and None) becomes [EOS, pad, pad, ...], with or without sticky."""
  for sticky in (False, True):
    out = Tokenizer(default_tokenizer_path(), 5, sticky_eos=sticky).encode(
        ['', None])
    np.testing.assert_array_equal(out, [[1, 0, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(
      Tokenizer(default_tokenizer_path(), 1).encode([''])[0], [1])
  assert Tokenizer(default_tokenizer_path(), 4).encode([]).shape == (0, 4)


def test_missing_model_and_bad_length_are_errors(tmp_path):
  """A model path that does not exist: FileNotFoundError naming it; a
  length below 1: ValueError."""
  missing = str(tmp_path / 'nowhere' / 'c4_en.model')
  with pytest.raises(FileNotFoundError, match='nowhere/c4_en.model'):
    Tokenizer(missing, 16)
  with pytest.raises(ValueError, match='length'):
    Tokenizer(default_tokenizer_path(), 0)


def test_decode_round_trips_synthetic_captions():
  """Every synthetic caption (all templates, 'an' articles, commas) decodes
  back to itself: the shipped model covers the synthetic vocabulary."""
  tokenizer = Tokenizer(default_tokenizer_path(), 48)
  source = synthetic.SyntheticSource(size=300, split='all', max_side=32)
  captions = [source.attributes(i)['caption'] for i in range(300)]
  captions += [f'a photo of a {name}.' for name in synthetic.class_names()]
  assert any(c.startswith('an ') for c in captions)
  rows = tokenizer.encode(captions)
  assert np.all(rows != 2)  # No unknown pieces.
  for caption, row in zip(captions, rows):
    assert row[-1] == 0  # Not cut.
    assert tokenizer.decode(row) == caption


@settings(max_examples=80, deadline=None)
@given(caption=st.text(alphabet='abcdefghijklmnopqrstuvwxyz ,.', max_size=60),
       length=st.integers(1, 20), sticky=st.booleans())
def test_rows_are_ids_eos_cut_then_padded(caption, length, sticky):
  """For any caption and T: the row is (ids + [EOS]) cut to T, its last
  token EOS when cut with sticky_eos, and padded with pad_id."""
  tokenizer = Tokenizer(default_tokenizer_path(), length, sticky_eos=sticky)
  row = tokenizer.encode([caption])[0]
  full = tokenizer._sp.encode(caption) + [tokenizer.eos_id]  # pylint: disable=protected-access
  kept = full[:length]
  if sticky and len(full) > length:
    kept[-1] = tokenizer.eos_id
  np.testing.assert_array_equal(row[:len(kept)], kept)
  assert np.all(row[len(kept):] == tokenizer.pad_id)
  assert row.shape == (length,) and row.dtype == np.int32


def run_trainer(*args):
  return subprocess.run([sys.executable, TRAIN_SCRIPT, *map(str, args)],
                        capture_output=True, text=True, timeout=120, cwd=REPO)


def test_train_sentencepiece_from_a_corpus(tmp_path):
  """train_sentencepiece.py --input trains a small model into tmp_path with
  c4_en's ids, and Tokenizer loads it and round-trips its corpus."""
  source = synthetic.SyntheticSource(size=200, split='all', max_side=32)
  lines = [source.attributes(i)['caption'] for i in range(200)]
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  prefix = tmp_path / 'out' / 'tiny'
  prefix.parent.mkdir()
  result = run_trainer('--input', corpus, '--model_prefix', prefix,
                       '--vocab_size', 40)
  assert result.returncode == 0, result.stderr
  assert f'wrote {prefix}.model' in result.stdout
  model = f'{prefix}.model'
  assert os.path.isfile(model) and os.path.isfile(f'{prefix}.vocab')
  tokenizer = Tokenizer(model, 32)
  assert tokenizer.pad_id == 0 and tokenizer.eos_id == 1
  assert tokenizer._sp.unk_id() == 2 and tokenizer._sp.bos_id() == -1  # pylint: disable=protected-access
  assert tokenizer.vocab_size <= 40
  rows = tokenizer.encode(lines[:20])
  for line, row in zip(lines, rows):
    assert tokenizer.decode(row) == line


def test_train_sentencepiece_needs_exactly_one_corpus(tmp_path):
  """Neither --input nor --synthetic (or both) is a usage error."""
  for args in ([], ['--input', tmp_path / 'c.txt', '--synthetic', 10]):
    result = run_trainer('--model_prefix', tmp_path / 'm', *args)
    assert result.returncode == 2
    assert 'exactly one of --input and --synthetic' in result.stderr
  assert not os.path.exists(tmp_path / 'm.model')
