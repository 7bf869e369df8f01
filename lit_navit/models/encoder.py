"""Pre-LN transformer encoder shared by the image and the text tower.

Parameter names follow big_vision's ViT (encoderblock / LayerNorm_0 /
MultiHeadDotProductAttention_0 / MlpBlock_0 / encoder_norm), so its
checkpoints map onto this tree; with `scan` the blocks' parameters are
stacked along a leading depth axis under 'encoderblock', as there.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lit_navit.models import attention as attention_lib
from lit_navit.models import partitioning
from lit_navit.models import precision

# 'weights_saveable': recompute everything but the fsdp-gathered weights
# (partitioning.py), so the backward pass does not gather them again.
REMAT_POLICIES = ('none', 'nothing_saveable', 'weights_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'everything_saveable')


def _dense_options(save_weights: bool) -> dict:
  options = precision.dense_options()
  if save_weights:
    options['dot_general'] = partitioning.saving_gathered_weights(
        options.get('dot_general', jax.lax.dot_general))
  return options

_kernel_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, back to the input width."""
  mlp_dim: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  save_weights: bool = False  # kernels through partitioning.gathered_weights

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(
        features, use_bias=self.use_bias, dtype=self.dtype,
        kernel_init=_kernel_init, bias_init=_bias_init, name=name,
        **_dense_options(self.save_weights))
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    return dense(x.shape[-1], 'Dense_1')(y)


class MultiHeadAttention(nn.Module):
  """Multi-head attention under a boolean mask, through the attention seam.

  `qk_norm` applies a (bias-free) LayerNorm to each head's queries and keys.
  """
  num_heads: int
  qk_norm: bool = False
  use_bias: bool = True
  attention: Any = 'dense'  # A name in attention.ATTENTION_FNS or a callable.
  dtype: Any = jnp.float32
  save_weights: bool = False  # kernels through partitioning.gathered_weights

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask):
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by {self.num_heads} heads')
    head_dim = width // self.num_heads
    project = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), use_bias=self.use_bias, dtype=self.dtype,
        kernel_init=_kernel_init, name=name, **_dense_options(self.save_weights))
    q = project('query')(inputs_q)
    k = project('key')(inputs_kv)
    v = project('value')(inputs_kv)
    if self.qk_norm:
      q = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='query_ln')(q)
      k = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='key_ln')(k)
    out = attention_lib.get(self.attention)(q, k, v, mask)
    return nn.DenseGeneral(width, axis=(-2, -1), use_bias=self.use_bias,
                           dtype=self.dtype, kernel_init=_kernel_init,
                           name='out', **_dense_options(self.save_weights))(out)


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x)). Returns (x, None) to suit nn.scan."""
  mlp_dim: int
  num_heads: int
  qk_norm: bool = False
  use_bias: bool = True
  attention: Any = 'dense'
  dtype: Any = jnp.float32
  save_weights: bool = False

  @nn.compact
  def __call__(self, x, mask):
    # Rows stay split over the batch axes: fsdp gathers weights, not these.
    x = partitioning.constrain_batch(x)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = MultiHeadAttention(
        self.num_heads, self.qk_norm, self.use_bias, self.attention, self.dtype,
        self.save_weights, name='MultiHeadDotProductAttention_0')(y, y, mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(self.mlp_dim, self.use_bias, self.dtype, self.save_weights,
                 name='MlpBlock_0')(y)
    return partitioning.constrain_batch(x + y), None


def _remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f'unknown remat_policy {name!r}; expected one of {REMAT_POLICIES}')
  if name == 'weights_saveable':
    return jax.checkpoint_policies.save_only_these_names(partitioning.GATHERED_WEIGHTS)
  return getattr(jax.checkpoint_policies, name)


class Encoder(nn.Module):
  """`depth` encoder blocks and a final LayerNorm.

  `scan` compiles one block and loops it (fast compiles, stacked params);
  `remat_policy` names a jax.checkpoint_policies policy to trade activation
  memory for recompute in the backward pass ('none' keeps everything;
  'weights_saveable' recomputes all but the fsdp-gathered weights).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  qk_norm: bool = False
  use_bias: bool = True
  attention: Any = 'dense'
  scan: bool = True
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    """x [B, L, width], mask broadcastable to [B, heads, L, L] -> [B, L, width]."""
    block = EncoderBlock
    if self.remat_policy != 'none':
      # Under scan the loop already stops CSE from undoing the remat.
      block = nn.remat(block, policy=_remat_policy(self.remat_policy),
                       prevent_cse=not self.scan)
    block_args = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                      qk_norm=self.qk_norm, use_bias=self.use_bias,
                      attention=self.attention, dtype=self.dtype,
                      save_weights=self.remat_policy == 'weights_saveable')
    x = x.astype(self.dtype)
    if self.scan:
      blocks = nn.scan(block, variable_axes={'params': 0},
                       split_rngs={'params': True}, in_axes=nn.broadcast,
                       length=self.depth)
      x, _ = blocks(**block_args, name='encoderblock')(x, mask)
    else:
      for i in range(self.depth):
        x, _ = block(**block_args, name=f'encoderblock_{i}')(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
