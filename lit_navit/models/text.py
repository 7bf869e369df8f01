"""Text tower: token + learned position embeddings, the shared encoder, pooling.

By default pad tokens (config `pad_id`) are masked out of attention and
pooling, so a caption's embedding does not depend on how much padding
follows it. With `mask_padding=False` the tower is big_vision's
text_transformer exactly: every token attends to every token, padding
included, and 'last' pools position T-1 whatever token sits there (the EOS
under SigLIP's pad-with-EOS tokenization, a pad token under SigLIP 2's).

Packed text rows (batch.py, text packing) hold several captions each: given
a `Packed`, tokens attend within their caption only (the image tower's
segment mask), positions restart at each caption, and every pool works per
caption, so a caption embeds as it would alone in its own row.
"""

import dataclasses

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from lit_navit.models import attention as attention_lib
from lit_navit.models import encoder
from lit_navit.models import pooling
from lit_navit.models import precision

POOLS = ('last', 'first') + pooling.POOLS


class Packed(NamedTuple):
  """Where the captions lie in G groups of R packed text rows (batch.py).

  segment, position: int [G, R, T]; row, row_segment: int [G, C], caption
  c's text row within its group and its segment there (0 for none). A
  tuple, so that jit takes it as arrays.
  """
  segment: Any
  position: Any
  row: Any
  row_segment: Any


class TextTransformer(nn.Module):
  """Tokens int [..., T] -> [..., out_dim or width] float32.

  With `mask_padding`, rows of padding only give zero vectors.

  Attributes:
    vocab_size, max_len: embedding table sizes (T <= max_len).
    width, depth, mlp_dim, num_heads: transformer size (see variants.py).
    pool: 'last' (last non-pad token, the EOS when the tokenizer appends one;
      position T-1 without mask_padding), 'first', 'map', 'mean' or 'max'.
    mask_padding: hide pad tokens from attention and pooling (see above).
    out_dim: width of a final linear 'head'; None for no head.
    causal: each token sees only earlier tokens.
    pad_id: the padding token.
    qk_norm, use_bias, attention, scan, remat_policy, dtype: see encoder.py.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = 'last'
  out_dim: int | None = None
  causal: bool = False
  pad_id: int = 0
  mask_padding: bool = True
  qk_norm: bool = False
  use_bias: bool = True
  attention: Any = 'dense'
  scan: bool = True
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, packed: Packed | None = None):
    """tokens [..., T], one caption a row -> [..., D]; with `packed`, text
    rows [G, R, T] -> one vector per caption [G*C, D]."""
    if self.pool not in POOLS:
      raise ValueError(f'unknown text pool {self.pool!r}; expected one of {POOLS}')
    *leading, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'text length {length} exceeds max_len {self.max_len}')
    if packed is not None and not self.mask_padding:
      raise ValueError('packed text rows need mask_padding=True')
    tokens = jnp.asarray(tokens).reshape(-1, length)

    x = nn.Embed(self.vocab_size, self.width, name='Embed_0')(tokens)
    pos = self.param('pos_embedding', nn.initializers.normal(self.width ** -0.5),
                     (1, self.max_len, self.width))
    x = x + (pos[:, :length] if packed is None
             else pos[0, packed.position.reshape(-1, length)])

    real = tokens != self.pad_id
    if not self.mask_padding:
      real = jnp.ones_like(real)
    mask = None
    if self.mask_padding:
      # Unpacked, a row is one caption: its real tokens are segment 1.
      caption = real * (1 if packed is None else packed.segment.reshape(-1, length))
      mask = attention_lib.Segments(caption, caption)
    if self.causal:
      causal = jnp.tril(jnp.ones((length, length), bool))
      mask = causal if mask is None else attention_lib.as_mask(mask) & causal
    x = encoder.Encoder(
        self.depth, self.mlp_dim, self.num_heads, self.qk_norm, self.use_bias,
        self.attention, self.scan, self.remat_policy, self.dtype,
        name='Encoder_0')(x, mask)

    if packed is None:
      first = jnp.zeros(x.shape[0], jnp.int32)
      pick = lambda at: x[jnp.arange(x.shape[0]), at]
      whole = lambda: x
    else:
      real, first, pick, whole = _captions_of_rows(x, real, packed)
    if self.pool in ('last', 'first'):
      pooled = pick(length - 1 - jnp.argmax(real[:, ::-1], axis=-1)
                    if self.pool == 'last' else first)
    elif self.pool == 'map':
      pooled = pooling.MAPHead(self.num_heads, self.mlp_dim, self.qk_norm,
                               self.use_bias, self.dtype,
                               name='MAPHead_0')(whole(), real[:, None, :])[:, 0]
    elif self.pool == 'max':
      pooled = pooling.masked_max(whole(), real[:, None, :])[:, 0]
    else:
      pooled = pooling.masked_mean(whole(), real[:, None, :])[:, 0]
    if self.out_dim is not None:
      pooled = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                        name='head', **precision.dense_options())(pooled)
    pooled = jnp.where(real.any(axis=-1, keepdims=True), pooled, 0)
    if packed is not None:
      return pooled.astype(jnp.float32)
    return pooled.astype(jnp.float32).reshape(*leading, -1)


def _captions_of_rows(x, real, packed: Packed):
  """Per caption of packed rows x [G*R, T, D]: (its real tokens [G*C, T],
  its first token's position, a function from positions [G*C] to those
  tokens' vectors, and one giving its whole row [G*C, T, D]).

  Each gather is batched over groups, like the image-to-caption gather, so
  with groups split over devices it stays on each device.
  """
  groups, length = packed.row.shape[0], x.shape[1]
  row = packed.row.reshape(groups, -1)

  def rows_of(a):  # [G*R, T, ...] -> each caption's row, [G*C, T, ...]
    index = row.reshape(*row.shape, *[1] * (a.ndim - 1))
    by_group = a.reshape(groups, -1, *a.shape[1:])
    return jnp.take_along_axis(by_group, index, axis=1).reshape(-1, *a.shape[1:])

  segment = packed.segment.reshape(-1, length)
  mine = rows_of(segment) == packed.row_segment.reshape(-1, 1)

  def pick(at):
    flat = x.reshape(groups, -1, x.shape[-1])
    index = (row * length + at.reshape(groups, -1))[..., None]
    return jnp.take_along_axis(flat, index, axis=1).reshape(-1, x.shape[-1])

  return mine & rows_of(real), jnp.argmax(mine, axis=-1), pick, lambda: rows_of(x)
