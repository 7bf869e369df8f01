"""model.f32_grads: bfloat16 compute, weight gradients summed in float32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tiny_config
from lit_navit import plan
from lit_navit import trainer as trainer_lib
from lit_navit.tpu import hlo
from lit_navit.models import precision

DIMS = [((5, 7, 4), (4, 3), ((2,), (0,))),        # Dense
        ((5, 6, 2, 3), (2, 3, 8), ((2, 3), (0, 1))),  # attention out projection
        ((5, 4), (4, 2, 3), ((1,), (0,)))]           # q/k/v projection


@pytest.mark.parametrize('x_shape,k_shape,contracting', DIMS)
def test_kernel_gradient_is_accumulated_in_float32(x_shape, k_shape, contracting):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
  dims = (contracting, ((), ()))
  loss = lambda dot: lambda x, k: jnp.sum(jnp.sin(dot(x, k, dims).astype(jnp.float32)))
  ours = jax.grad(loss(precision.dot_general), argnums=(0, 1))(x, kernel)
  plain = lambda x, k, dims: lax.dot_general(x, k.astype(x.dtype), dims)
  np.testing.assert_array_equal(precision.dot_general(x, kernel, dims),
                                plain(x, kernel, dims))
  np.testing.assert_array_equal(ours[0], jax.grad(loss(plain))(x, kernel))
  # The reference: the same bfloat16 operands and cotangent, summed in float32.
  g = jnp.cos(plain(x, kernel, dims).astype(jnp.float32)).astype(jnp.bfloat16)
  _, vjp = jax.vjp(lambda k: lax.dot_general(x.astype(jnp.float32), k, dims), kernel)
  assert ours[1].dtype == jnp.float32
  np.testing.assert_allclose(ours[1], vjp(g.astype(jnp.float32))[0], rtol=1e-5,
                             atol=1e-5)


def _bf16_sums(f32_grads, devices):
  """Bytes of bfloat16 arrays the TPU step sums over devices."""
  config = tiny_config.get_config('batch=8')
  config.model.dtype = 'bfloat16'
  config.model.f32_grads = f32_grads
  text = trainer_lib.Trainer(config, None, devices=devices).compile_step(8).as_text()
  summed = [line.split(' all-reduce')[0] for line in text.splitlines()
            if re.search(r' all-reduce(-start)?\(', line)]
  return sum(n for line in summed for n in hlo.array_bytes(
      ' '.join(re.findall(r'bf16\[[\d,]*\]', line))))


def test_the_tpu_step_sums_weight_gradients_in_float32():
  # On TPU (a CPU backend sums bfloat16 in float32 anyway): the kernels'
  # gradients leave bfloat16; biases and norm scales keep the compute dtype.
  devices = plan.topology_devices('v5e:2x2')
  plain, ours = _bf16_sums(False, devices), _bf16_sums(True, devices)
  assert ours < 0.1 * plain, (ours, plain)
