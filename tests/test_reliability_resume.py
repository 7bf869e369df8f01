"""Resume errors that tell the truth: a checkpoint of another model is a
config mismatch, a storage failure is the storage's, and neither sets a good
step aside. Real orbax checkpoints of a small state."""

import os

import jax
import numpy as np
import optax
import pytest

from lit_navit import checkpoint
from lit_navit import config as config_lib

import tiny_config


def _config(**model):
  config = config_lib.load_config_file(tiny_config.__file__)
  config.model.update(model)
  return config


def _state(width, value=0.0):
  """A train state as the trainer's: step, params and Adam's state (tuples
  and named tuples, which orbax's metadata gives back as lists)."""
  params = {'img': {'w': np.full((width, 3), value, np.float32)}, 't': np.ones(1, np.float32)}
  return {'step': np.int32(value), 'params': params, 'opt_state': optax.adam(1e-3).init(params)}


def _abstract(width):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device),
                      jax.eval_shape(lambda: _state(width)))


@pytest.fixture
def saved(tmp_path):
  """A workdir with good steps 1 and 2 of a model of width 64."""
  checkpointer = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (1, 2):
    checkpointer.save(step, _state(64, step), {'position': step}, _config(embed_dim=64))
  checkpointer.close()
  return str(tmp_path)


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.mark.parametrize('start_over', [False, True])
def test_another_model_is_a_config_mismatch_naming_the_keys(saved, start_over):
  checkpointer = checkpoint.Checkpointer(saved, keep=3, async_save=False)
  with pytest.raises(checkpoint.ConfigMismatch) as error:
    checkpointer.restore_latest(_abstract(32), _config(embed_dim=32),
                                start_over=start_over)
  checkpointer.close()
  message = str(error.value)
  assert 'model.embed_dim (saved 64, now 32)' in message
  assert 'unreadable' not in message and '--start_over' not in message
  assert '\n' not in message and len(message) < 400
  assert _steps(saved) == ['1', '2']  # good steps are never set aside


def test_the_same_model_resumes(saved):
  checkpointer = checkpoint.Checkpointer(saved, keep=3, async_save=False)
  step, state, data = checkpointer.restore_latest(_abstract(64), _config(embed_dim=64))
  checkpointer.close()
  assert (step, data) == (2, {'position': 2})
  np.testing.assert_array_equal(state['params']['img']['w'], np.full((64, 3), 2, np.float32))


@pytest.mark.parametrize('error', [
    # tensorstore's status, as bad gs:// credentials give it (thousands of
    # characters of spec and payload follow).
    ValueError('UNAUTHENTICATED: Error reading "gs://b/ckpt/2/state/manifest.ocdbt": '
               + 'x' * 5000),
    PermissionError(13, 'Permission denied'),
])
def test_a_storage_error_is_named_as_such_and_sets_nothing_aside(saved, error):
  checkpointer = checkpoint.Checkpointer(saved, keep=3, async_save=False)

  def refuse(*args, **kwargs):
    raise error
  checkpointer._manager.restore = refuse  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointStorageError) as raised:
    checkpointer.restore_latest(_abstract(64), _config(embed_dim=64), start_over=True)
  checkpointer.close()
  message = str(raised.value)
  assert 'storage refused or did not answer' in message and 'step 2' in message
  assert 'unreadable' not in message and '--start_over' not in message
  assert len(message) < 600
  assert _steps(saved) == ['1', '2']


def test_a_damaged_step_of_the_same_model_is_still_set_aside(saved):
  """The mismatch check does not mistake damage for another model: step 2's
  metadata (shapes) is intact but reading its arrays fails."""
  checkpointer = checkpoint.Checkpointer(saved, keep=3, async_save=False)
  manager = checkpointer._manager  # pylint: disable=protected-access
  restore = manager.restore

  def damaged(step, *args, **kwargs):
    if step == 2:
      raise ValueError('DATA_LOSS: Error reading "params.w": checksum mismatch')
    return restore(step, *args, **kwargs)
  manager.restore = damaged
  step, _, _ = checkpointer.restore_latest(_abstract(64), _config(embed_dim=64))
  checkpointer.close()
  assert step == 1 and _steps(saved) == ['1', '2.corrupt-0']


def test_a_long_reason_keeps_its_cause():
  """Errors are one short line, and still say why (the cause comes last in
  tensorstore's messages; the paths in the middle go)."""
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "' + '/deep' * 300
                     + '": Failed to write 3060 bytes: No space left on device')
  reason = checkpoint._reason(error)  # pylint: disable=protected-access
  assert reason.startswith('ValueError: RESOURCE_EXHAUSTED: Error writing')
  assert reason.endswith('No space left on device') and len(reason) < 340
