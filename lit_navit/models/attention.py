"""The attention seam: one signature, several kernels, chosen by config `attention`.

An attention function maps q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] and a
mask to [B, Lq, H, Dh]. The mask is either `Segments` (packed rows: a token
attends to the tokens of its own segment) or a boolean array broadcastable
to [B, H, Lq, Lk] (True = may attend; None = all). Dense kernels expand
`Segments` with `segment_mask`; splash takes the ids as they are and never
materialises an [L, L] mask. Segment masks never leave a query row empty,
so no kernel meets an all-masked softmax row.

GPU: this jax's public `jax.nn.dot_product_attention` takes a mask or
per-row lengths, not segment ids, so cuDNN runs packed rows with the dense
mask ('cudnn'); its internal THD (q_offsets) path is not public API.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lit_navit.models import partitioning

AttentionFn = Callable[..., jax.Array]


class Segments(NamedTuple):
  """Segment ids of queries [B, Lq] and keys [B, Lk]; equal ids attend."""
  q: jax.Array
  kv: jax.Array


def as_mask(mask):
  """A boolean mask for dense kernels, from `Segments` or a mask as is."""
  return segment_mask(*mask) if isinstance(mask, Segments) else mask


def segment_mask(q_segment, kv_segment):
  """Mask [B, 1, Lq, Lk]: a query sees the keys of its own segment.

  Padding (segment 0) sees padding only: its rows stay non-empty, so softmax
  stays finite, and no real token ever sees it, so nothing leaks.
  """
  return (q_segment[:, None, :, None] == kv_segment[:, None, None, :])


def dense_attention(q, k, v, mask=None):
  """Masked softmax attention with einsums; softmax in float32."""
  mask = as_mask(mask)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  if mask is not None:
    # A finite fill: a row with no allowed key averages instead of making NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _fused_attention(q, k, v, mask=None, *, implementation):
  return jax.nn.dot_product_attention(q, k, v, mask=as_mask(mask),
                                      implementation=implementation)


def _block(length: int) -> int:
  """Splash's tile along a sequence: the largest of 512, 256, 128 dividing it."""
  return next((b for b in (512, 256, 128) if length % b == 0), length)


def splash_attention(q, k, v, mask=None, *, interpret: bool = False):
  """TPU splash attention over packed segments (Pallas), no [L, L] mask.

  `interpret` runs the kernel in Pallas' interpreter (any backend; tests).
  Under a mesh (partitioning.py) the kernel runs per device on its rows:
  a Pallas call is opaque to XLA's partitioner.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  if not isinstance(mask, Segments):
    raise ValueError("attention='splash' needs segment ids (packed rows), not a "
                     'mask array: a causal text tower cannot use it')
  _, lq, heads, head_dim = q.shape
  lk = k.shape[1]
  bq, bkv = _block(lq), _block(lk)
  blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                 block_q_dkv=bq, block_kv_dkv=bkv,
                                 block_kv_dkv_compute=bkv, block_q_dq=bq,
                                 block_kv_dq=bkv)
  kernel = kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([mask_lib.FullMask((lq, lk))] * heads),
      block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)

  def rows(q, k, v, q_segment, kv_segment):
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, L, D]
    # Splash does not scale its logits.
    out = jax.vmap(kernel)(heads_first(q * head_dim ** -0.5), heads_first(k),
                           heads_first(v), segment_ids=kernel_lib.SegmentIds(
                               q_segment, kv_segment))
    return heads_first(out)

  args = (q, k, v, mask.q.astype(jnp.int32), mask.kv.astype(jnp.int32))
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in partitioning.BATCH_AXES if a in mesh.axis_names)
  if mesh.empty or not axes:
    return rows(*args)
  spec = P(axes)
  return jax.shard_map(rows, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec,
                       check_vma=False)(*args)


ATTENTION_FNS = {
    'dense': dense_attention,
    'xla': functools.partial(_fused_attention, implementation='xla'),
    # GPU only; needs bfloat16 or float16 inputs.
    'cudnn': functools.partial(_fused_attention, implementation='cudnn'),
    # TPU only (a Pallas kernel); segment ids, so packed rows only.
    'splash': splash_attention,
}


def get(attention: str | AttentionFn) -> AttentionFn:
  """The attention function named by config `attention`, or a callable as is."""
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f'unknown attention {attention!r}; '
                     f'expected one of {sorted(ATTENTION_FNS)} or a callable')
  return ATTENTION_FNS[attention]
