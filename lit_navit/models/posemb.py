"""Position embeddings of packed patches, from each token's (y, x) and its image's grid.

Every kind maps `yx` int [..., 2] (patch row, column inside its image) and
`grid` int [..., 2] (that image's rows, cols in patches, per token) to
[..., width] float32. Coordinates past the trained table never index out of
range: they are clamped (learned tables) or interpolated (resized grid).
"""

import flax.linen as nn
import jax.numpy as jnp

KINDS = ('learn_factorized', 'fractional_factorized', 'sincos_factorized',
         'sincos2d', 'learn_2d_resized', 'learn_1d_resized')


def resize_weights(position, out_size, in_size: int, antialias: bool):
  """Per-sample weights of a linear resize from `in_size` to `out_size` samples.

  The weights `jax.image.resize(..., 'bilinear', antialias)` gives output
  sample `position` (half-pixel centres, triangle kernel widened by the size
  ratio when antialiasing a downsample, renormalised at the borders), but
  with a traced `out_size`, one per token.

  Args:
    position: output sample index, int [...].
    out_size: output length, int [...] >= 1, broadcastable against position.
    in_size: input length (static).
    antialias: widen the kernel when downsampling.

  Returns:
    float32 [..., in_size], each row summing to 1.
  """
  inv_scale = in_size / out_size[..., None]
  kernel_scale = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
  # Valid positions already lie in [-0.5, in_size - 0.5]; clipping keeps one
  # past the output's end from getting all-zero weights.
  centre = jnp.clip((position[..., None] + 0.5) * inv_scale - 0.5,
                    -0.5, in_size - 0.5)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centre - jnp.arange(in_size)) / kernel_scale)
  return weights / weights.sum(axis=-1, keepdims=True)


def _table_init(width: int):
  return nn.initializers.normal(stddev=width ** -0.5)


class LearnedFactorized(nn.Module):
  """Separate learned row and column tables indexed by absolute coordinate, summed."""
  width: int
  max_grid: int

  @nn.compact
  def __call__(self, yx, grid):
    del grid  # Absolute coordinates: the image size plays no part.
    shape = (self.max_grid, self.width)
    table_y = self.param('pos_embedding_y', _table_init(self.width), shape)
    table_x = self.param('pos_embedding_x', _table_init(self.width), shape)
    coords = jnp.clip(yx, 0, self.max_grid - 1)
    return table_y[coords[..., 0]] + table_x[coords[..., 1]]


class FractionalFactorized(nn.Module):
  """Learned row and column tables indexed by the fractional coordinate.

  A token at row y of an image `rows` patches tall reads bucket
  floor(y / rows * max_grid), so every image spans the whole table.
  """
  width: int
  max_grid: int

  @nn.compact
  def __call__(self, yx, grid):
    shape = (self.max_grid, self.width)
    table_y = self.param('pos_embedding_y', _table_init(self.width), shape)
    table_x = self.param('pos_embedding_x', _table_init(self.width), shape)
    # Padding tokens carry grid 0: any positive size keeps them finite.
    buckets = (yx * self.max_grid) // jnp.maximum(grid, 1)
    buckets = jnp.clip(buckets, 0, self.max_grid - 1)
    return table_y[buckets[..., 0]] + table_x[buckets[..., 1]]


class SincosFactorized(nn.Module):
  """Fixed sinusoids: half the channels encode y, half encode x."""
  width: int
  temperature: float = 10_000.0

  @nn.compact
  def __call__(self, yx, grid):
    del grid
    if self.width % 4:
      raise ValueError(f'sincos_factorized needs width divisible by 4, got {self.width}')
    quarter = self.width // 4
    omega = 1.0 / self.temperature ** (jnp.arange(quarter) / quarter)
    angles = yx[..., :, None].astype(jnp.float32) * omega  # [..., 2, quarter]
    halves = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return halves.reshape(*yx.shape[:-1], self.width)


class Sincos2d(nn.Module):
  """big_vision's `posemb_sincos_2d` (MoCo v3) at each token's absolute (y, x).

  Channels are [sin x, cos x, sin y, cos y], each a quarter of the width, with
  frequencies temperature ** -(i / (width / 4 - 1)): a ViT trained with
  big_vision's sincos2d sees the same embedding here.
  """
  width: int
  temperature: float = 10_000.0

  @nn.compact
  def __call__(self, yx, grid):
    del grid
    if self.width % 4 or self.width < 8:
      raise ValueError(f'sincos2d needs width divisible by 4 and >= 8, got {self.width}')
    quarter = self.width // 4
    omega = 1.0 / self.temperature ** (jnp.arange(quarter) / (quarter - 1))
    y = yx[..., 0:1].astype(jnp.float32) * omega
    x = yx[..., 1:2].astype(jnp.float32) * omega
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


class Learned2dResized(nn.Module):
  """A learned [G, G, width] grid bilinearly resized to each image's (rows, cols).

  SigLIP 2 NaFlex style: token (y, x) of a rows x cols image gets the value the
  grid resized to rows x cols has at (y, x) (antialiased as NaFlex does, so
  its checkpoints can be imported). Computed per token as interpolation
  weights over the G x G grid, so shapes stay static.

  With `flat` the table is stored as [1, G*G, width], row-major over the
  grid: big_vision ViT's learned 1-D posemb, which a G x G image reads as is.
  `grid_shape` (rows, cols) makes the grid rectangular (a ViT trained on
  non-square images); unset, it is max_grid x max_grid.
  """
  width: int
  max_grid: int
  antialias: bool = True
  flat: bool = False
  grid_shape: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, yx, grid):
    rows, cols = self.grid_shape or (self.max_grid, self.max_grid)
    shape = (1, rows * cols, self.width) if self.flat else (rows, cols, self.width)
    table = self.param('pos_embedding', _table_init(self.width), shape)
    size = jnp.maximum(grid, 1)  # Padding tokens carry grid 0.
    w_y = resize_weights(yx[..., 0], size[..., 0], rows, self.antialias)
    w_x = resize_weights(yx[..., 1], size[..., 1], cols, self.antialias)
    weights = (w_y[..., :, None] * w_x[..., None, :]).reshape(*yx.shape[:-1], rows * cols)
    return weights @ table.reshape(rows * cols, self.width)


def make(kind: str, width: int, max_grid: int, name: str = 'posemb',
         grid_shape: tuple[int, int] | None = None) -> nn.Module:
  """The position-embedding module named by config `posemb`; `grid_shape`
  applies to the resized kinds."""
  if kind == 'learn_factorized':
    return LearnedFactorized(width, max_grid, name=name)
  if kind == 'fractional_factorized':
    return FractionalFactorized(width, max_grid, name=name)
  if kind == 'sincos_factorized':
    return SincosFactorized(width, name=name)
  if kind == 'sincos2d':
    return Sincos2d(width, name=name)
  if kind == 'learn_2d_resized':
    return Learned2dResized(width, max_grid, grid_shape=grid_shape, name=name)
  if kind == 'learn_1d_resized':
    return Learned2dResized(width, max_grid, flat=True, grid_shape=grid_shape,
                            name=name)
  raise ValueError(f'unknown posemb {kind!r}; expected one of {KINDS}')
