"""Checkpoint retention: `keep` newest steps plus every `keep_every`-th, on disk."""

import os

import jax.numpy as jnp
import pytest

from lit_navit import checkpoint
import tiny_config


def _saved_steps(workdir):
  root = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


@pytest.mark.parametrize('keep,keep_every,expected', [
    (2, 0, [6, 7]),
    (1, 3, [3, 6, 7]),
])
def test_keep_newest_and_every_kth(tmp_path, keep, keep_every, expected):
  saver = checkpoint.Checkpointer(str(tmp_path), keep=keep, keep_every=keep_every,
                                  async_save=False)
  config = tiny_config.get_config()
  for step in range(1, 8):
    saver.save(step, {'step': jnp.int32(step), 'w': jnp.full((2,), step, jnp.float32)},
               {'step': step}, config)
  saver.close()
  assert _saved_steps(str(tmp_path)) == expected
