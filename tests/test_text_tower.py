"""Text tower: padding invariance for every pooling, causality, shapes."""

import functools

import jax
import numpy as np
import pytest

from lit_navit.models import text

PAD = 0
CAPTIONS = [[5, 9, 3, 2], [7, 2], [4, 4, 4, 6, 8, 2], []]  # The last is an empty slot.


def tokens(captions, length):
  out = np.full((len(captions), length), PAD, np.int32)
  for i, caption in enumerate(captions):
    out[i, :len(caption)] = caption
  return out


@functools.lru_cache(maxsize=None)
def tower(pool='last', causal=False):
  model = text.TextTransformer(vocab_size=16, max_len=12, width=32, depth=2,
                               mlp_dim=64, num_heads=2, pool=pool, out_dim=8,
                               causal=causal, pad_id=PAD)
  params = jax.jit(model.init)(jax.random.key(0), tokens(CAPTIONS, 6))
  return params, jax.jit(model.apply)


def embed(token_array, **kwargs):
  params, apply = tower(**kwargs)
  return np.asarray(apply(params, token_array))


# Every pooling, one of them causal; two text lengths each, so two compiles.
@pytest.mark.parametrize('pool,causal', [('last', False), ('first', True),
                                         ('map', False), ('mean', False)])
def test_padding_does_not_change_captions(pool, causal):
  short = embed(tokens(CAPTIONS, 6), pool=pool, causal=causal)
  long = embed(tokens(CAPTIONS, 12), pool=pool, causal=causal)
  assert short.shape == (4, 8)
  np.testing.assert_allclose(long, short, atol=1e-5, rtol=1e-5)
  assert np.all(short[3] == 0)  # An all-pad (empty) slot embeds to zero.
  assert not np.allclose(short[0], short[1], atol=1e-3)


def test_last_pooling_reads_the_last_real_token():
  # Same prefix, different final token: 'last' must see the difference.
  out = embed(tokens([[5, 9, 3, 2], [5, 9, 3, 7], [], []], 6))
  assert not np.allclose(out[0], out[1], atol=1e-3)


def test_causal_tokens_ignore_later_tokens():
  # With 'first' pooling a causal tower sees the first token only.
  out = embed(tokens([[5, 9, 3, 2], [5, 1, 1, 1], [5], [6, 9]], 6),
              pool='first', causal=True)
  np.testing.assert_allclose(out[1], out[0], atol=1e-6)
  np.testing.assert_allclose(out[2], out[0], atol=1e-6)
  assert not np.allclose(out[3], out[0], atol=1e-3)


def test_leading_axes_are_kept():
  flat = embed(tokens(CAPTIONS, 6))
  params, apply = tower()
  nested = apply(params, tokens(CAPTIONS, 6).reshape(2, 2, 6))
  np.testing.assert_allclose(nested.reshape(4, 8), flat, atol=1e-6)


def test_too_long_or_unknown_pool_raises():
  params, apply = tower()
  with pytest.raises(ValueError, match='exceeds max_len'):
    apply(params, tokens(CAPTIONS, 13))
  model = text.TextTransformer(16, 12, 32, 1, 64, 2, pool='cls')
  with pytest.raises(ValueError, match='unknown text pool'):
    model.init(jax.random.key(0), tokens(CAPTIONS, 6))
