"""Orbax checkpoints in a workdir: save, keep, restore, resume.

Layout (one directory per step, written atomically by orbax):

  WORKDIR/checkpoints/<step>/state   params, optimizer state, step, rng
  WORKDIR/checkpoints/<step>/data    the input pipeline's iterator state (JSON)
  WORKDIR/checkpoints/<step>/config  the training config (JSON), so a step
                                     directory alone is enough for evaluation

A newest checkpoint that fails to restore is reported, renamed aside to
`<step>.corrupt-<n>` (never deleted) and the previous one is used.
"""

import json
import logging
import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'

log = logging.getLogger('lit_navit')


class Checkpointer:
  """Saves and restores the train state, the data state and the config."""

  def __init__(self, workdir: str, *, keep: int, keep_every: int = 0,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, config) -> None:
    """Starts an (async) save of `step`; orbax commits it atomically."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_to_json(config)),
    ), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """Returns (step, state, data_state) of the newest good checkpoint, or None.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying shardings.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ))
        return step, restored['state'], restored['data']
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read a step means that step is unusable; fall back.
        log.error('checkpoint step %d in %s is unreadable (%s: %s); '
                      'using the previous one', step, self.directory,
                      type(e).__name__, e)
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of orbax's sight without deleting anything."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      n = 0
      while os.path.exists(f'{src}.corrupt-{n}'):
        n += 1
      os.rename(src, f'{src}.corrupt-{n}')
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def step_directory(path: str) -> str:
  """A workdir (its newest complete step) or a step directory -> step directory."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  root = os.path.join(path, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    root = path
  steps = [int(d) for d in os.listdir(root)
           if re.fullmatch(r'\d+', d) and os.path.isdir(os.path.join(root, d, 'state'))]
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint under {path!r}')
  return os.path.join(root, str(max(steps)))


def load_for_inference(path: str):
  """Reads (config, params) from a workdir or a step directory.

  Only the params are read (not the optimizer state), onto this process's
  first device, whatever mesh they were trained on.
  """
  step_dir = step_directory(path)
  with open(os.path.join(step_dir, 'config', 'metadata'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  state_dir = os.path.join(step_dir, 'state')
  saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {'params': jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      saved['params'])}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return config, restored['params']
