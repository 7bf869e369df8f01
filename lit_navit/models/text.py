"""Text tower: token + learned position embeddings, the shared encoder, pooling.

By default pad tokens (config `pad_id`) are masked out of attention and
pooling, so a caption's embedding does not depend on how much padding
follows it. With `mask_padding=False` the tower is big_vision's
text_transformer exactly: every token attends to every token, padding
included, and 'last' pools position T-1 whatever token sits there (the EOS
under SigLIP's pad-with-EOS tokenization, a pad token under SigLIP 2's).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lit_navit.models import attention as attention_lib
from lit_navit.models import encoder
from lit_navit.models import pooling
from lit_navit.models import precision

POOLS = ('last', 'first') + pooling.POOLS


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
  def __call__(self, tokens):
    if self.pool not in POOLS:
      raise ValueError(f'unknown text pool {self.pool!r}; expected one of {POOLS}')
    *leading, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'text length {length} exceeds max_len {self.max_len}')
    tokens = jnp.asarray(tokens).reshape(-1, length)

    x = nn.Embed(self.vocab_size, self.width, name='Embed_0')(tokens)
    pos = self.param('pos_embedding', nn.initializers.normal(self.width ** -0.5),
                     (1, self.max_len, self.width))
    x = x + pos[:, :length]

    real = tokens != self.pad_id
    if not self.mask_padding:
      real = jnp.ones_like(real)
    mask = attention_lib.segment_mask(real, real) if self.mask_padding else None
    if self.causal:
      causal = jnp.tril(jnp.ones((length, length), bool))
      mask = causal if mask is None else mask & causal
    x = encoder.Encoder(
        self.depth, self.mlp_dim, self.num_heads, self.qk_norm, self.use_bias,
        self.attention, self.scan, self.remat_policy, self.dtype,
        name='Encoder_0')(x, mask)

    if self.pool == 'last':
      last = length - 1 - jnp.argmax(real[:, ::-1], axis=-1)
      pooled = x[jnp.arange(x.shape[0]), last]
    elif self.pool == 'first':
      pooled = x[:, 0]
    elif self.pool == 'map':
      pooled = pooling.MAPHead(self.num_heads, self.mlp_dim, self.qk_norm,
                               self.use_bias, self.dtype,
                               name='MAPHead_0')(x, real[:, None, :])[:, 0]
    elif self.pool == 'max':
      pooled = pooling.masked_max(x, real[:, None, :])[:, 0]
    else:
      pooled = pooling.masked_mean(x, real[:, None, :])[:, 0]
    if self.out_dim is not None:
      pooled = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                        name='head', **precision.dense_options())(pooled)
    pooled = jnp.where(real.any(axis=-1, keepdims=True), pooled, 0)
    return pooled.astype(jnp.float32).reshape(*leading, -1)
