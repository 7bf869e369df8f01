"""Float32 weight gradients for a bfloat16 model (config `model.f32_grads`).

Under a bfloat16 `model.dtype` a kernel is cast to bfloat16 before its
matmul, so its gradient comes out of the backward matmul in bfloat16, and
under data parallelism XLA sums the shards' partial gradients in that
dtype, before the cast back to the float32 parameter. `dot_general` here
keeps the kernel float32 up to the matmul and computes its gradient with
bfloat16 operands but a float32 result, so the cross-device sum (all-reduce
or reduce-scatter) runs in float32. Forward values are unchanged.

The trainer turns it on around its step (`f32_grads`), as it sets the mesh:
the towers' dense layers read `dense_options()` when they are traced.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax


_ENABLED = contextvars.ContextVar('f32_grads', default=False)


@contextlib.contextmanager
def f32_grads(enabled: bool = True):
  """Within: dense layers traced get float32 kernel gradients."""
  token = _ENABLED.set(enabled)
  try:
    yield
  finally:
    _ENABLED.reset(token)


def dense_options() -> dict:
  """Keyword arguments for nn.Dense / nn.DenseGeneral under `f32_grads`."""
  if not _ENABLED.get():
    return {}
  return {'dot_general': dot_general, 'promote_dtype': promote_keeping_kernel}


def promote_keeping_kernel(inputs, kernel, bias=None, *, dtype=None, inexact=True):
  """flax's promote_dtype, except the kernel keeps its (float32) dtype."""
  del inexact
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return cast(inputs), kernel, cast(bias)


def _free(ndim, contracting):
  return [d for d in range(ndim) if d not in contracting]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(x, kernel, contracting):
  return lax.dot_general(x, kernel.astype(x.dtype), (contracting, ((), ())))


def _dot_fwd(x, kernel, contracting):
  return _dot(x, kernel, contracting), (x, kernel)


def _dot_bwd(contracting, residuals, g):
  x, kernel = residuals
  (xc, kc) = contracting
  x_free, k_free = _free(x.ndim, xc), _free(kernel.ndim, kc)
  g = g.astype(x.dtype)
  g_x_dims = list(range(len(x_free)))
  g_k_dims = list(range(len(x_free), g.ndim))
  # dk: x's free dims summed against g's; float32 out, so the sum over
  # devices that XLA adds here runs in float32.
  dk = lax.dot_general(x, g, ((x_free, g_x_dims), ((), ())),
                       preferred_element_type=jnp.float32)  # [xc..., k_free...]
  order = list(kc) + k_free
  dk = jnp.transpose(dk, [order.index(d) for d in range(kernel.ndim)])
  dx = lax.dot_general(g, kernel.astype(x.dtype), ((g_k_dims, k_free), ((), ())))
  order = x_free + list(xc)  # dx is [x_free..., kc...]
  dx = jnp.transpose(dx, [order.index(d) for d in range(x.ndim)])
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dot_general(x, kernel, dimension_numbers, precision=None,
                preferred_element_type=None):
  """lax.dot_general's signature (as flax calls it), float32 kernel gradients."""
  del precision, preferred_element_type
  contracting, batch = dimension_numbers
  if batch != ((), ()):
    raise ValueError('f32_grads: batched dot_general is not supported')
  return _dot(x, kernel, tuple(tuple(c) for c in contracting))
