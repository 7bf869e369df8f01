"""NaViT image tower: packed patches of many images per row -> one vector per slot.

Reads the packed-batch contract (lit_navit/data/batch.py): patches
[B, L, p*p*3], yx [B, L, 2], segment [B, L], grid [B, E, 2]. Tokens attend
only within their own image, pooling is per slot, and an empty slot yields a
zero vector. The patch size p is read off the patches, so one set of weights
serves every patch size (FlexiViT PI-resize of the stored kernel).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lit_navit.data import patches as patches_lib
from lit_navit.models import attention as attention_lib
from lit_navit.models import encoder
from lit_navit.models import flexi
from lit_navit.models import pooling
from lit_navit.models import posemb as posemb_lib
from lit_navit.models import precision


STEMS = ('conv', 'dense')


def _stem_init(conv_shape):
  """lecun_normal over the conv fan-in, whatever shape the kernel is stored in."""
  def init(key, shape, dtype=jnp.float32):
    return nn.initializers.lecun_normal()(key, conv_shape, dtype).reshape(shape)
  return init


def patch_size_of(patch_dim: int) -> int:
  """p from the flattened patch length p*p*3."""
  p = math.isqrt(patch_dim // 3)
  if p * p * 3 != patch_dim:
    raise ValueError(f'image/patches last dim {patch_dim} is not p*p*3')
  return p


class PatchEmbedding(nn.Module):
  """Linear map of flattened (py, px, c) patches to width.

  The kernel is stored at `base_patch_size` p0 as [p0, p0, 3, width] with
  stem 'conv' (big_vision ViT's conv kernel) or as [p0*p0*3, width] with stem
  'dense' (NaFlex's), the same numbers in (py, px, c) order either way, and
  PI-resized to the input's patch size.
  """
  width: int
  base_patch_size: int
  use_bias: bool = True
  resize_fn: flexi.ResizeFn = patches_lib.resize_image
  dtype: Any = jnp.float32
  stem: str = 'conv'

  @nn.compact
  def __call__(self, patches):
    if self.stem not in STEMS:
      raise ValueError(f'unknown image stem {self.stem!r}; expected one of {STEMS}')
    p = patch_size_of(patches.shape[-1])
    p0 = self.base_patch_size
    conv_shape = (p0, p0, 3, self.width)
    shape = conv_shape if self.stem == 'conv' else (p0 * p0 * 3, self.width)
    kernel = self.param('kernel', _stem_init(conv_shape), shape)
    kernel = flexi.pi_resize(kernel.reshape(conv_shape), p, self.resize_fn)
    kernel = kernel.reshape(p * p * 3, self.width)
    if precision.dense_options():
      x = precision.dot_general(patches.astype(self.dtype), kernel,
                                (((patches.ndim - 1,), (0,)), ((), ())))
    else:
      x = patches.astype(self.dtype) @ kernel.astype(self.dtype)
    if self.use_bias:
      x = x + self.param('bias', nn.initializers.zeros, (self.width,)).astype(self.dtype)
    return x


class NaViT(nn.Module):
  """Packed ViT. Returns [B, E, out_dim or width] float32, zero for empty slots.

  Attributes:
    width, depth, mlp_dim, num_heads: transformer size (see variants.py).
    base_patch_size: patch size the embedding kernel is stored at.
    posemb: a kind in posemb.KINDS.
    max_grid: position table size (patches per side).
    posemb_grid: (rows, cols) of a rectangular resized grid; None: square.
    stem: 'conv' or 'dense', how the patch-embedding kernel is stored.
    pool: 'map' (attention pooling per slot), 'mean' or 'max'.
    out_dim: width of a final linear 'head'; None for no head.
    qk_norm, use_bias, attention, scan, remat_policy, dtype: see encoder.py.
    resize_fn: the pipeline's image resize, for the PI-resize matrix.
    mask_token: a learned 'mask_token' [width] param, which replaces the
      patch embedding of the tokens a call marks `masked` (iBOT / TIPS).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  base_patch_size: int
  posemb: str = 'learn_factorized'
  max_grid: int = 64
  pool: str = 'map'
  out_dim: int | None = None
  qk_norm: bool = False
  use_bias: bool = True
  attention: Any = 'dense'
  scan: bool = True
  remat_policy: str = 'none'
  dtype: Any = jnp.float32
  resize_fn: flexi.ResizeFn = patches_lib.resize_image
  stem: str = 'conv'
  posemb_grid: tuple[int, int] | None = None
  mask_token: bool = False

  @nn.compact
  def __call__(self, patches, yx, segment, grid, *, return_tokens: bool = False,
               masked=None):
    """[B, E, D] per-slot vectors; with `return_tokens` also the encoder's
    un-pooled output [B, L, width] (after its final LayerNorm), which the
    per-token objectives (captioning decoder, masked prediction) read.
    `masked` bool [B, L]: tokens whose patch embedding becomes the mask
    token, before the position embedding is added (so a masked token still
    says where it is)."""
    if self.pool not in pooling.POOLS:
      raise ValueError(f'unknown image pool {self.pool!r}; expected one of {pooling.POOLS}')
    segment, grid = jnp.asarray(segment), jnp.asarray(grid)
    batch, _, _ = patches.shape
    if patches.dtype == jnp.uint8:
      # Normalised here so that a quarter of float32's bytes cross to the
      # device; padding keeps the host path's zeros.
      pixels = patches.astype(jnp.float32) / 127.5 - 1
      patches = jnp.where(segment[..., None] != 0, pixels, 0.0)
    slots = grid.shape[1]
    x = PatchEmbedding(self.width, self.base_patch_size, self.use_bias,
                       self.resize_fn, self.dtype, self.stem,
                       name='embedding')(patches)
    if self.mask_token:
      token = self.param('mask_token', nn.initializers.normal(0.02), (self.width,))
      if masked is not None:
        x = jnp.where(jnp.asarray(masked)[..., None], token.astype(self.dtype), x)
    elif masked is not None:
      raise ValueError('masked tokens need NaViT(mask_token=True) '
                       '(model.distill.masked_weight > 0)')

    # Each token's image size; padding reads slot 1's, which nothing uses.
    token_grid = grid[jnp.arange(batch)[:, None], jnp.maximum(segment - 1, 0)]
    pos = posemb_lib.make(self.posemb, self.width, self.max_grid,
                          grid_shape=self.posemb_grid)(yx, token_grid)
    x = x + pos.astype(self.dtype)

    x = encoder.Encoder(
        self.depth, self.mlp_dim, self.num_heads, self.qk_norm, self.use_bias,
        self.attention, self.scan, self.remat_policy, self.dtype,
        name='Transformer')(x, attention_lib.Segments(segment, segment))

    slot_mask = segment[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]
    if self.pool == 'map':
      pooled = pooling.MAPHead(self.num_heads, self.mlp_dim, self.qk_norm,
                               self.use_bias, self.dtype, name='MAPHead_0')(x, slot_mask)
    elif self.pool == 'max':
      pooled = pooling.masked_max(x, slot_mask)
    else:
      pooled = pooling.masked_mean(x, slot_mask)
    if self.out_dim is not None:
      pooled = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                        name='head', **precision.dense_options())(pooled)
    nonempty = slot_mask.any(axis=-1, keepdims=True)
    pooled = jnp.where(nonempty, pooled, 0).astype(jnp.float32)
    return (pooled, x) if return_tokens else pooled
