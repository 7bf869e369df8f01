"""What the eval/ scripts share: model flags, joining the processes of a
multi-host run, loading a checkpoint, JSON output, and ending a user error
with one line (`run`)."""

import json
import math
import os
import sys

import numpy as np

from lit_navit import fs
from lit_navit.data import resolution


def add_model_flags(parser, max_tokens_help='token budget per image',
                    resize='fit'):
  """--checkpoint, --max_tokens, --resize, --patch_size, --batch_rows,
  --output, --no_progress.

  `resize` is --resize's default; None leaves the choice to the script
  (eval/query.py takes the export's).
  """
  resize_default = resize or "the export's, else fit"
  parser.add_argument('--checkpoint', required=True,
                      help='a workdir (its newest checkpoint) or one step directory')
  parser.add_argument('--max_tokens', default=None,
                      help=f'{max_tokens_help} (default: the training config\'s '
                      'input.resolution.max_tokens, else the tokens of its '
                      'largest training image, capped at a row)')
  parser.add_argument('--resize', choices=resolution.EVAL_MODES,
                      default=resize,
                      help="how an image meets the budget: 'fit' scales it up "
                      'or down to fill the budget (SigLIP 2 NaFlex; one image '
                      "a row); 'native' keeps its own size, scaled down only "
                      "to fit, and packs small images several a row; 'square' "
                      'stretches it to a square, as a plain ViT sees it (default: '
                      f'{resize_default})')
  parser.add_argument('--patch_size', type=int, default=None,
                      help='patch size (default: the first of the training '
                      'config\'s input.patch_sizes)')
  parser.add_argument('--batch_rows', type=int, default=64,
                      help='packed rows per image batch (a row holds one '
                      "image with --resize fit, several with native)")
  parser.add_argument('--output', default=None, help='write results as JSON here')
  parser.add_argument('--no_progress', action='store_true',
                      help='hide progress bars')
  parser.add_argument('--debug', action='store_true',
                      help='show the traceback of a user error')


def add_host_flags(parser):
  """--coordinator_address, --num_processes, --process_id, --heartbeat_timeout:
  run the script on every host of a slice (see `join_hosts`)."""
  parser.add_argument('--coordinator_address', default=None,
                      help='multi-host: host:port of process 0 (TPU slices '
                      'need none of these flags; JAX_COORDINATOR_ADDRESS, '
                      'JAX_NUM_PROCESSES and JAX_PROCESS_ID work too)')
  parser.add_argument('--num_processes', type=int, default=None,
                      help='multi-host: the number of processes')
  parser.add_argument('--process_id', type=int, default=None,
                      help='multi-host: this process\'s index')
  parser.add_argument('--heartbeat_timeout', type=int, default=100,
                      help='multi-host: seconds after which a silent (dead) '
                      'process makes the others stop with an error')


def join_hosts(args):
  """Joins the processes of a multi-host run (see `add_host_flags`); does
  nothing on one host. Each process then embeds its share of the images
  and gets everyone's; process 0 writes the files (`is_writer`)."""
  from lit_navit import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, args.heartbeat_timeout)


def is_writer():
  """Whether this process writes the outputs: process 0 of a multi-host run."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def run(main):
  """Runs a script's main(argv) on sys.argv: a user error is one line."""
  from lit_navit import train  # pylint: disable=g-import-not-at-top
  from lit_navit import user_errors  # pylint: disable=g-import-not-at-top
  train.setup_logging()
  argv = sys.argv[1:]
  user_errors.run(main, argv, debug='--debug' in argv)


def parse_token_budgets(value):
  """'64,128,256' -> [64, 128, 256]; None -> [None] (the default budget)."""
  if value is None:
    return [None]
  try:
    budgets = [int(v) for v in str(value).split(',') if v.strip()]
  except ValueError as e:
    raise ValueError(f'--max_tokens {value!r}: expected integers like 64,128,256') from e
  if not budgets or min(budgets) < 1:
    raise ValueError(f'--max_tokens {value!r}: expected positive integers')
  return budgets


def load_checkpoint(path):
  """(config, params) of a workdir (its newest readable step, logged) or of
  one step directory (an error naming it if it cannot be read)."""
  from lit_navit import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_for_inference(path)


def make_embedder(config, params, args, max_tokens=None):
  """An `embed.Embedder` for the checkpoint at the flags' resize mode,
  budget and patch size."""
  from lit_navit.evaluate import embed  # pylint: disable=g-import-not-at-top
  return embed.Embedder.from_config(config, params, args.batch_rows,
                                    resize=args.resize, max_tokens=max_tokens,
                                    patch_size=args.patch_size)


def to_json(value):
  """Numpy values to plain Python; NaN and infinities to None; bytes (exact
  file names) to text with surrogate escapes, which `os.fsencode` undoes."""
  if isinstance(value, bytes):
    return os.fsdecode(value)
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_json(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path, value):
  """Writes `value` (see `to_json`) to `path`, creating its folder."""
  fs.makedirs(fs.dirname(fs.absolute(path)))
  with fs.atomic_write(path, 'w', encoding='utf-8') as f:
    json.dump(to_json(value), f, indent=2)
    f.write('\n')
