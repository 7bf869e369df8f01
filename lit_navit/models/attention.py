"""The attention seam: one signature, several kernels, chosen by config `attention`.

An attention function maps q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] and a
boolean mask broadcastable to [B, H, Lq, Lk] (True = may attend; None = all)
to [B, Lq, H, Dh]. Masks from `segment_mask` never leave a query row empty,
so no kernel meets an all-masked softmax row.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def segment_mask(q_segment, kv_segment):
  """Mask [B, 1, Lq, Lk]: a query sees the keys of its own segment.

  Padding (segment 0) sees padding only: its rows stay non-empty, so softmax
  stays finite, and no real token ever sees it, so nothing leaks.
  """
  return (q_segment[:, None, :, None] == kv_segment[:, None, None, :])


def dense_attention(q, k, v, mask=None):
  """Masked softmax attention with einsums; softmax in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  if mask is not None:
    # A finite fill: a row with no allowed key averages instead of making NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _fused_attention(q, k, v, mask=None, *, implementation):
  return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                      implementation=implementation)


ATTENTION_FNS = {
    'dense': dense_attention,
    'xla': functools.partial(_fused_attention, implementation='xla'),
    # GPU only; needs bfloat16 or float16 inputs.
    'cudnn': functools.partial(_fused_attention, implementation='cudnn'),
}


def get(attention: str | AttentionFn) -> AttentionFn:
  """The attention function named by config `attention`, or a callable as is."""
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f'unknown attention {attention!r}; '
                     f'expected one of {sorted(ATTENTION_FNS)} or a callable')
  return ATTENTION_FNS[attention]
