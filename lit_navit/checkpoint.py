"""Orbax checkpoints in a workdir: save, keep, restore, resume.

Layout (one directory per step, written atomically by orbax):

  WORKDIR/checkpoints/<step>/state   params, optimizer state, step, rng
  WORKDIR/checkpoints/<step>/data    the input pipeline's iterator state (JSON)
  WORKDIR/checkpoints/<step>/config  the training config (JSON), so a step
                                     directory alone is enough for evaluation;
                                     read over today's defaults, so a step
                                     saved before a key existed still loads

The trainer and the eval scripts restore the same way (`newest_readable`):
newest step first, and a step that fails to read is reported and the one
before it tried. The trainer renames a bad step aside to `<step>.corrupt-<n>`
(never deleted, never onto an existing name); the eval scripts only read.
When no step can be read the trainer stops and lists them, unless told to
start over. A step that reads fine but holds another model than the config
makes (ConfigMismatch, naming the config keys that differ), or that the
storage will not give (CheckpointStorageError), is never set aside: the run
stops naming that cause.
"""

import json
import logging
import os
import re
import sys
import traceback
import types

import jax
import ml_collections
import orbax.checkpoint as ocp

from lit_navit import config as config_lib
from lit_navit import fs

CHECKPOINT_DIR = 'checkpoints'

log = logging.getLogger('lit_navit')


class Checkpointer:
  """Saves and restores the train state, the data state and the config."""

  def __init__(self, workdir: str, *, keep: int, keep_every: int = 0,
               async_save: bool = True):
    self.directory = fs.absolute(fs.join(workdir, CHECKPOINT_DIR))
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = self._open()
    _quiet_orbax_errors()

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, config) -> None:
    """Starts an (async) save of `step`; orbax commits it atomically.

    Raises SaveFailed if this save, or an earlier one still finishing in the
    background, fails (a full disk, say).
    """
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config_to_json(config)),
      ), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e

  def wait(self) -> None:
    """Waits for a background save; raises SaveFailed if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e

  def _failed(self, error):
    return SaveFailed(f'saving a checkpoint in {self.directory} failed '
                      f'({_reason(error)}); the newest complete one is step '
                      f'{self._manager.latest_step()}')

  def restore_latest(self, abstract_state, config=None, *, start_over: bool = False):
    """Returns (step, state, data_state) of the newest good checkpoint, or None.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying shardings;
    `config` is this run's config. Steps newer than the one restored are set
    aside. When there are steps but none can be read this raises
    UnreadableCheckpoint, or, with `start_over`, sets them all aside and
    returns None. A step that is fine but holds another model (ConfigMismatch)
    or that storage will not give (CheckpointStorageError) stops the run
    whatever `start_over` says, and nothing is set aside.
    """
    def restore(step):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ))
      except Exception as e:  # pylint: disable=broad-except
        step_dir = fs.join(self.directory, str(step))
        if _storage_error(e):
          raise CheckpointStorageError(
              f'reading checkpoint step {step} in {self.directory} failed: the '
              f'storage refused or did not answer ({_reason(e)}); check the '
              'credentials and the connection, then rerun') from e
        mismatch = _mismatch(step_dir, abstract_state, config)
        if mismatch:
          raise ConfigMismatch(
              f'checkpoint step {step} in {self.directory} holds another model '
              f'than this config makes: {mismatch}. Resume with the saved '
              'values, or train in another workdir') from e
        raise
      return restored['state'], restored['data']

    steps = self._manager.all_steps()
    if not steps:
      return None
    try:
      step, (state, data_state), failed = newest_readable(steps, restore,
                                                          self.directory)
    except UnreadableCheckpoint as e:
      if not start_over:
        raise UnreadableCheckpoint(
            f'{e}; nothing was changed. Pass --start_over to train from '
            'scratch (the unreadable steps are then kept as <step>.corrupt-<n>)'
        ) from e
      log.warning('%s; starting over as asked', e)
      for bad in steps:
        self._set_aside(bad)
      return None
    for bad, _ in failed:
      self._set_aside(bad)
    return step, state, data_state

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of orbax's sight without deleting anything."""
    if jax.process_index() == 0:
      src = fs.join(self.directory, str(step))
      n = 0
      while fs.exists(f'{src}.corrupt-{n}'):
        n += 1
      fs.rename(src, f'{src}.corrupt-{n}')
    # Reopening passes orbax's all-process barrier before listing the steps,
    # so no process lists the moved step (and refuses to save it again).
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


class SaveFailed(OSError):
  """A checkpoint could not be written; the earlier ones are intact."""


class UnreadableCheckpoint(ValueError):
  """No checkpoint could be read (or not the one asked for)."""


class ConfigMismatch(ValueError):
  """A readable checkpoint holds another model than the config makes."""


class CheckpointStorageError(OSError):
  """The storage (credentials, network) failed, not the checkpoint."""


# Status codes (tensorstore's, gRPC's) of a storage that refused or did not
# answer: nothing is known about the checkpoint itself.
_STORAGE_CODES = ('PERMISSION_DENIED', 'UNAUTHENTICATED', 'UNAVAILABLE',
                  'DEADLINE_EXCEEDED')


def _storage_error(error: BaseException) -> bool:
  """Whether `error`, or an error behind it, is the storage's, not the data's."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (PermissionError, ConnectionError, TimeoutError)):
      return True
    if str(error).lstrip().startswith(_STORAGE_CODES):
      return True
    error = error.__cause__ or error.__context__
  return False


def _flat(tree, prefix='') -> dict:
  """{'a.b': leaf} of nested dicts."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f'{prefix}.{key}' if prefix else str(key)))
  return out


def _mismatch(step_dir: str, abstract_state, config) -> str | None:
  """What makes a step's saved state differ from `abstract_state` (the
  config keys that differ from its saved config, else the arrays), or None
  when its shapes match or cannot be read (a damaged step)."""
  def shapes(tree):
    # The params: nested dicts in the state and in orbax's metadata alike
    # (the optimizer state's tuples come back as lists).
    tree = tree.get('params', tree)
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))}

  try:
    saved = shapes(ocp.StandardCheckpointer().metadata(
        fs.join(step_dir, 'state')).item_metadata.tree)
  except Exception:  # pylint: disable=broad-except
    return None
  wanted = shapes(abstract_state)
  if saved == wanted:
    return None
  if config is not None:
    try:
      with fs.open(fs.join(step_dir, 'config', 'metadata'), 'r') as f:
        saved_config = _flat(config_to_json(over_defaults(json.load(f))))
    except (OSError, ValueError):
      saved_config = None
    if saved_config is not None:
      now = _flat(config_to_json(config))
      differ = [f'{key} (saved {saved_config.get(key)!r}, now {now.get(key)!r})'
                for key in sorted(set(saved_config) | set(now))
                if saved_config.get(key) != now.get(key)]
      if differ:
        return 'config keys that differ from its saved config: ' + ', '.join(differ)
  arrays = [f'{k} (saved {saved.get(k)}, now {wanted.get(k)})'
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  return 'arrays that differ: ' + ', '.join(arrays[:5])


def over_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved training config, with today's default for each key it lacks.

  Keys are added with defaults that keep the old behaviour, so a checkpoint
  saved before a key existed reads as it was trained. Saved values win, and
  keys today's schema lacks are kept as saved.
  """
  def overlay(default, saved):
    if not (isinstance(default, dict) and isinstance(saved, dict)):
      return saved
    return {**default, **{k: overlay(default.get(k), v) for k, v in saved.items()}}

  return ml_collections.ConfigDict(overlay(config_to_json(config_lib.default_config()), saved))


def newest_readable(steps, restore, where: str):
  """Tries restore(step) newest step first until one works.

  Returns (step, restore(step), [(newer step, reason it failed)]); every
  failure is logged. Raises UnreadableCheckpoint listing every step and its
  reason when none works.
  """
  _quiet_abandoned_reads()
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step), failed
    except (ConfigMismatch, CheckpointStorageError):
      raise  # Not the step's fault: no older one would do better.
    except Exception as e:  # pylint: disable=broad-except
      # Whatever fails to read (missing file, bad bytes, bad JSON), the step
      # is unusable: try the one before it.
      failed.append((step, _reason(e)))
      log.error('checkpoint step %d in %s is unreadable (%s)', step, where,
                failed[-1][1])
  raise UnreadableCheckpoint(
      f'no checkpoint in {where} is readable: ' +
      '; '.join(f'step {step}: {reason}' for step, reason in failed))


def _quiet_abandoned_reads():
  """When a restore fails, the reads it started and no longer waits for end
  later, each printing a stray traceback on stderr: a tensorstore callback
  into orbax's closed event loop ('Event loop is closed'), a read coroutine
  closed by the garbage collector (whose error handler then raises), or a
  read task or future whose error nobody retrieved (asyncio logs it).
  Those, and only those, are dropped: the failure itself is reported once,
  by the caller.

  Installed before the first read: they can land before the failure has
  even reached our except clause."""
  previous = sys.unraisablehook
  if not getattr(previous, 'lit_navit_quiet', False):
    def hook(unraisable):
      error = unraisable.exc_value
      late_callback = (isinstance(error, RuntimeError)
                       and str(error) == 'Event loop is closed')
      closed_read = (isinstance(unraisable.object, types.CoroutineType)
                     and isinstance(error.__cause__, GeneratorExit))
      if not (late_callback or closed_read):
        previous(unraisable)

    hook.lit_navit_quiet = True
    sys.unraisablehook = hook
  asyncio_log = logging.getLogger('asyncio')
  if _UnretrievedOrbaxRead not in map(type, asyncio_log.filters):
    asyncio_log.addFilter(_UnretrievedOrbaxRead())


def _quiet_orbax_errors():
  """Orbax logs each failure of a save (a full disk, say) from every thread
  it touched, with tracebacks: some 90 lines before the error it raises to
  us, which we report on one line (SaveFailed). Its error logs are dropped;
  what failed reaches the user through that exception."""
  absl_log = logging.getLogger('absl')
  if _OrbaxErrors not in map(type, absl_log.filters):
    absl_log.addFilter(_OrbaxErrors())


class _OrbaxErrors(logging.Filter):

  def filter(self, record):
    return not (record.levelno >= logging.ERROR
                and f'{os.sep}orbax{os.sep}' in record.pathname)


class _UnretrievedOrbaxRead(logging.Filter):
  """Drops asyncio's '<Task or future> exception was never retrieved' for
  the reads of orbax and tensorstore."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    first_line = record.getMessage().split('\n', 1)[0]
    return not (first_line.endswith(' exception was never retrieved')
                and error is not None and _read_error(error))


def _read_error(error: BaseException) -> bool:
  """Raised in orbax's code, or set by tensorstore (no Python frames, and
  its status code first: 'OUT_OF_RANGE: Error reading ...')."""
  if error.__traceback__ is None:
    return re.match(r'[A-Z_]+: ', str(error)) is not None
  frames = traceback.extract_tb(error.__traceback__)
  return any(f'{os.sep}orbax{os.sep}' in frame.filename for frame in frames)


def _reason(error: Exception) -> str:
  """The first line of an error, without tensorstore's spec dump, at most
  about 300 characters."""
  lines = str(error).strip().splitlines()
  first = (lines[0] if lines else '').split(' [tensorstore_spec=')[0]
  if len(first) > 300:  # the middle goes: paths; the cause is at the end
    first = f'{first[:150]} ... {first[-150:]}'
  return f'{type(error).__name__}: {first}'


def _step_dirs(path: str) -> dict:
  """{step: step directory} under a workdir (or its checkpoints folder)."""
  root = fs.join(path, CHECKPOINT_DIR)
  if not fs.isdir(root):
    root = path
  return {int(d): fs.join(root, d) for d in fs.listdir(root)
          if re.fullmatch(r'\d+', d) and fs.isdir(fs.join(root, d))}


def load_for_inference(path: str):
  """Reads (config, params) from a workdir or a step directory.

  A workdir gives its newest readable step (older ones are tried when newer
  ones fail, and the step used is logged); a step directory gives that step
  or an UnreadableCheckpoint error naming it. Only the params are read (not
  the optimizer state), onto this process's first device, whatever mesh
  they were trained on.
  """
  path = fs.absolute(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  if fs.isdir(fs.join(path, 'state')) or re.fullmatch(r'\d+', fs.basename(path)):
    _quiet_abandoned_reads()
    try:
      return _read_step(path)
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpoint(
          f'checkpoint {path} is unreadable ({_reason(e)})') from e
  step_dirs = _step_dirs(path)
  if not step_dirs:
    raise FileNotFoundError(f'no checkpoint under {path!r}')
  step, loaded, _ = newest_readable(
      step_dirs, lambda step: _read_step(step_dirs[step]), path)
  log.info('using checkpoint step %d of %s', step, path)
  return loaded


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config of a workdir's newest step, or of one step directory, read
  without its params (LiT's config adopts a tower from it)."""
  path = fs.absolute(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  step_dir = path
  if not (fs.isdir(fs.join(path, 'state')) or re.fullmatch(r'\d+', fs.basename(path))):
    step_dirs = _step_dirs(path)
    if not step_dirs:
      raise FileNotFoundError(f'no checkpoint under {path!r}')
    step_dir = step_dirs[max(step_dirs)]
  return _read_config(step_dir)


def _read_config(step_dir: str) -> ml_collections.ConfigDict:
  config_path = fs.join(step_dir, 'config', 'metadata')
  with fs.open(config_path, 'r', encoding='utf-8') as f:
    try:
      return over_defaults(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f'{config_path} line {e.lineno}: invalid JSON ({e.msg})') from e


def _read_step(step_dir: str):
  """(config, params) of one step directory; raises if any part is bad."""
  config = _read_config(step_dir)
  state_dir = fs.join(step_dir, 'state')
  metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  if metadata is None:
    raise ValueError(f'{state_dir} has no readable metadata (files missing or damaged)')
  saved = metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {'params': jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      saved['params'])}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return config, restored['params']
