"""Pooling of token sequences into one vector per slot, under a [B, E, L] mask.

slot_mask[b, e, l] says token l of row b belongs to slot e. Both towers use
it: the image tower with E image slots per row, the text tower with one slot
(the caption's non-pad tokens) per sequence. A slot with no token pools to a
finite vector that callers zero out.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lit_navit.models import attention as attention_lib
from lit_navit.models import encoder
from lit_navit.models import partitioning

POOLS = ('map', 'mean', 'max')


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned probe queries each slot's tokens."""
  num_heads: int
  mlp_dim: int
  qk_norm: bool = False
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, slot_mask):
    """x [B, L, D], slot_mask bool [B, E, L] -> [B, E, D]."""
    x = partitioning.constrain_batch(x)
    batch, _, width = x.shape
    slots = slot_mask.shape[1]
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width))
    queries = jnp.broadcast_to(probe, (batch, slots, width)).astype(self.dtype)
    # E queries per row: always the dense kernel, its cost is negligible.
    pooled = encoder.MultiHeadAttention(
        self.num_heads, self.qk_norm, self.use_bias,
        attention_lib.dense_attention, self.dtype,
        name='MultiHeadDotProductAttention_0')(queries, x, slot_mask[:, None])
    pooled = partitioning.constrain_batch(pooled)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(pooled)
    return partitioning.constrain_batch(
        pooled + encoder.MlpBlock(self.mlp_dim, self.use_bias, self.dtype,
                                  name='MlpBlock_0')(y))


def masked_mean(x, slot_mask):
  """Mean of each slot's tokens: x [B, L, D], slot_mask [B, E, L] -> [B, E, D]."""
  weights = slot_mask.astype(jnp.float32)
  counts = jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
  sums = jnp.einsum('bel,bld->bed', weights, x.astype(jnp.float32))
  return (sums / counts).astype(x.dtype)


def masked_max(x, slot_mask):
  """Channel-wise max of each slot's tokens: [B, L, D], [B, E, L] -> [B, E, D]."""
  lowest = jnp.finfo(x.dtype).min
  return jnp.max(jnp.where(slot_mask[..., None], x[:, None], lowest), axis=2)
