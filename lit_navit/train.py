"""Entry point: `python -m lit_navit.train --config configs/NAME.py[:args] --workdir DIR`.

Overrides follow big_vision: `--config.total_steps=100 --config.input.source.kind=wds`,
and any key can be set, lists too: `--config.mesh="[('data', -1), ('fsdp', 8)]"`.
A user error (bad key, value or file) ends with one line; --debug shows the
traceback.
Multi-host: TPU pods need no flags; elsewhere pass --coordinator_address,
--num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""

import logging
import sys
import uuid

from absl import app
from absl import flags
from absl import logging as absl_logging

from lit_navit import command_line
from lit_navit import fs
from lit_navit import user_errors

flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and summaries go.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.DEFINE_integer('heartbeat_timeout', 100, 'Multi-host: seconds after which a '
                     'silent (dead) process makes the others stop with an error.')
flags.DEFINE_bool('start_over', False, 'Start from scratch even though every '
                  'checkpoint in the workdir is unreadable (they are kept, renamed).')
flags.DEFINE_bool('debug', False, 'Show the traceback of a user error.')
# A plain string, loaded by us: an error in the file or its args is then a
# user error (one line, exit 2), not a flag-parsing traceback.
flags.DEFINE_string('config', None, 'Config file, as path.py[:args]; '
                    '--config.a.b=value overrides a key.')
FLAGS = flags.FLAGS


def check_workdir(workdir: str) -> None:
  """Fails now, not at the first save, if the workdir (local or gs://)
  cannot be written."""
  bucket = fs.missing_bucket(workdir)
  if bucket:
    raise FileNotFoundError(f'workdir {workdir!r}: bucket {bucket} does not exist')
  # One name per process: the hosts of a run probe the same workdir at once.
  probe = fs.join(workdir, f'.write_probe-{uuid.uuid4().hex}')
  try:
    fs.makedirs(workdir)
    with fs.atomic_write(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    fs.remove(probe)
  except OSError as e:
    raise PermissionError(f'workdir {workdir!r} is not writable: {e}') from e


def setup_logging() -> None:
  """lit_navit's own messages at INFO on stderr; libraries' (orbax, absl) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  # orbax warns that a checkpoint lacks optional metadata on every restore.
  logging.getLogger('absl').setLevel(logging.ERROR)
  log = logging.getLogger('lit_navit')
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def train(config, workdir: str, hooks=(), start_over: bool = False):
  """Checks the config and workdir, then trains; returns the trainer's RunResult.

  `start_over`: train from scratch when every checkpoint is unreadable,
  instead of stopping with an error.
  """
  # Imported here so `--help` and config errors don't pay for jax start-up.
  import jax  # pylint: disable=g-import-not-at-top
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  from lit_navit import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_threefry_partitionable', True)
  setup_logging()
  config_lib.check_config(config)
  config_lib.check_paths(config)
  check_workdir(workdir)
  from lit_navit import sharding  # pylint: disable=g-import-not-at-top
  from lit_navit import workdir_lock  # pylint: disable=g-import-not-at-top
  lock = workdir_lock.WorkdirLock(workdir)
  sharding.run_on_process_0(lock.acquire)  # one lock per run, process 0's
  try:
    trainer = trainer_lib.Trainer(config, workdir, start_over=start_over)
    return trainer.run(hooks=hooks(trainer) if callable(hooks) else hooks)
  finally:
    lock.release()


def _main(argv, overrides=()):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  user_errors.run(_run, FLAGS.config, overrides, debug=FLAGS.debug)


def _run(spec, overrides):
  from lit_navit import config as config_lib  # pylint: disable=g-import-not-at-top
  from lit_navit import sharding  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(spec)
  config_lib.apply_overrides(config, overrides)
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, FLAGS.heartbeat_timeout)
  result = train(config, FLAGS.workdir, start_over=FLAGS.start_over)
  if result.preempted:
    logging.getLogger('lit_navit').warning('preempted: checkpoint saved, exiting')


def main():
  command_line.run(_main)


if __name__ == '__main__':
  main()
