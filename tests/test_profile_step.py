"""benchmarks/profile_step.py: a real XLA CPU profile, attributed to model parts."""

import os
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from lit_navit.models import encoder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                'benchmarks'))
import profile_step  # pylint: disable=wrong-import-position


@pytest.mark.slow  # The profiler's start and stop take seconds.
def test_a_train_step_profile_splits_into_model_parts(tmp_path):
  model = encoder.Encoder(depth=2, mlp_dim=256, num_heads=4, scan=False)
  x = jax.random.normal(jax.random.key(0), (4, 32, 64))
  params = model.init(jax.random.key(1), x, None)
  tx = optax.adam(1e-3)

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x, None) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = {'now': (params, tx.init(params))}
  compiled = jax.jit(step).lower(*state['now']).compile()

  def run_step():
    *state['now'], loss = compiled(*state['now'])
    jax.block_until_ready(loss)

  run_step()
  result = profile_step.breakdown(compiled, run_step, 2, str(tmp_path))
  parts = result['parts']
  assert {'MLP', 'attention proj', 'attention core', 'layer norm', 'optimizer'} <= set(parts)
  assert all(seconds > 0 for seconds in parts.values())
  assert abs(sum(parts.values()) - result['busy_seconds']) < 1e-9
  assert abs(sum(s for _, s, _ in result['top']) - result['busy_seconds']) < 1e-9
  # The model's time is attributed to its parts, not left over.
  assert parts.get('other', 0) < 0.5 * result['busy_seconds']


def test_part_of_reads_flax_module_paths():
  forward = 'jit(step)/jvp(Encoder)/encoderblock_0/'
  assert profile_step.part_of([forward + 'MlpBlock_0/Dense_0/dot_general']) == 'MLP'
  assert profile_step.part_of(
      [forward + 'MultiHeadDotProductAttention_0/query/dot_general']) == 'attention proj'
  assert profile_step.part_of(
      ['jit(step)/transpose(jvp(Encoder))/encoderblock_0/'
       'MultiHeadDotProductAttention_0/softmax/exp']) == 'attention core'
  assert profile_step.part_of([forward + 'LayerNorm_0/rsqrt']) == 'layer norm'
  assert profile_step.part_of(['jit(step)/sqrt', 'jit(step)/mul']) == 'optimizer'
  assert profile_step.part_of(['', forward + 'add']) == 'other'
  # A fusion goes to the part most of its ops belong to.
  assert profile_step.part_of([forward + 'MlpBlock_0/Dense_1/add',
                               forward + 'MlpBlock_0/Dense_1/dot_general',
                               forward + 'LayerNorm_1/mul']) == 'MLP'
