"""What every study in experiments/ shares: train an arm with the project's
own trainer, evaluate it zero-shot on the synthetic held-out classes at a
token budget, aggregate seeds, and write the results JSON and a PNG.

An arm is a config from `tiny_config` plus the study's changes; each seed of
an arm trains in its own workdir (a temporary one unless `--workdir` is
given) and is read back through `checkpoint.load_for_inference`, as the
eval/ scripts read checkpoints.
"""

import argparse
import atexit
import json
import math
import os
import platform
import shutil
import tempfile
import time

from lit_navit import config as config_lib
from lit_navit import fs

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'demo.py')

# 12 images per held-out pair on average; chance is 1/64 (every class).
DEFAULT_EVAL_EXAMPLES = 144


def parse_args(description, argv=None, *, steps, seeds=3,
               eval_examples=DEFAULT_EVAL_EXAMPLES, extra_flags=()):
  """The flags every study takes, with the study's defaults, and the
  study's own `extra_flags`: (name, argparse kwargs) pairs."""
  parser = argparse.ArgumentParser(description=description)
  for name, kwargs in extra_flags:
    parser.add_argument(name, **kwargs)
  parser.add_argument('--out', default='experiments/results',
                      help='folder for NAME.json and NAME.png')
  parser.add_argument('--workdir', default=None,
                      help='where arms train (default: a temporary folder, removed)')
  parser.add_argument('--seeds', type=int, default=seeds, help='seeds per arm')
  parser.add_argument('--steps', type=int, default=steps, help='training steps per arm')
  parser.add_argument('--scale', type=float, default=1.0,
                      help='multiplies steps and eval examples (a bigger machine)')
  parser.add_argument('--eval_examples', type=int, default=eval_examples,
                      help='images per eval set and point')
  parser.add_argument('--eval_sides', default=None,
                      type=lambda text: [int(v) for v in text.split(',')],
                      help='comma-separated eval resolutions in px (default: the study\'s)')
  parser.add_argument('--arms', default=None,
                      help='comma-separated subset of the study\'s arms')
  args = parser.parse_args(argv)
  args.keep_workdirs = args.workdir is not None
  if not args.keep_workdirs:
    args.workdir = tempfile.mkdtemp(prefix='lit_navit_exp_')
    atexit.register(shutil.rmtree, args.workdir, ignore_errors=True)
  use_compilation_cache(os.path.join(args.workdir, 'xla_cache'))
  args.steps = max(1, round(args.steps * args.scale))
  args.eval_examples = max(12, round(args.eval_examples * args.scale))
  return args


def select_arms(args, arms: dict) -> dict:
  """The arms `--arms` names (all by default), in the study's order."""
  if not args.arms:
    return dict(arms)
  names = args.arms.split(',')
  unknown = [n for n in names if n not in arms]
  if unknown:
    raise SystemExit(f'--arms: unknown {unknown}; expected some of {list(arms)}')
  return {n: arms[n] for n in names}


def tiny_config(*, steps, seed, patch_size=16, min_side=32, max_side=128,
                source_max_side=256, max_aspect=2.0, object_scale=1.0,
                lr=1e-2, checkpoints=1):
  """configs/demo.py's SigLIP model ('mu' towers, synthetic source), set up
  for one study arm.

  Images are drawn up to `source_max_side` pixels (objects `object_scale`
  times the usual size) and trained with their longer side uniform on
  [min_side, max_side] pixels, in patches of `patch_size`. `checkpoints`
  evenly spaced steps are saved, the last one final; nothing is evaluated
  during training.
  """
  c = config_lib.load_config_file(
      f'{DEMO_CONFIG}:steps={steps},seed={seed},batch=16')
  c.input.source.update(max_side=source_max_side, max_aspect=max_aspect,
                        object_scale=object_scale)
  c.input.captions_per_row = None
  c.input.patch_sizes = (patch_size,)
  c.input.resolution.update(min=min_side, max=max_side)
  c.input.pack_buffer = 256
  c.input.workers = 1
  c.model.image.variant = f'mu/{patch_size}'
  c.optim.lr = lr
  c.optim.schedule = [('.*', dict(decay_type='cosine',
                                  warmup_steps=min(50, max(1, steps // 10))))]
  c.evals = config_lib.default_config().evals
  c.checkpoint.update(every=max(1, math.ceil(steps / checkpoints)),
                      keep=checkpoints + 1, async_save=False)
  c.log_every = max(1, steps // 4)
  return c


def use_compilation_cache(folder):
  """Runs of one shape (seeds of an arm) compile once: later ones read XLA's
  cache. A cache the process already has (JAX_COMPILATION_CACHE_DIR) is kept."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def step_flops(config) -> float:
  """Training FLOPs of one step of `config` on one device (both towers,
  `models/flops.py`), averaged over its patch sizes."""
  from lit_navit.data import pipeline  # pylint: disable=g-import-not-at-top
  from lit_navit.models import flops  # pylint: disable=g-import-not-at-top
  sizes = tuple(config.input.patch_sizes)
  return sum(flops.training_flops(config.model, pipeline.batch_spec(
      config.input, rows=config.batch_size, groups=1, patch_size=p))
             for p in sizes) / len(sizes)


def checkpoint_steps(workdir) -> list[int]:
  """The steps saved under `workdir`, ascending."""
  from lit_navit import checkpoint  # pylint: disable=g-import-not-at-top
  root = fs.join(workdir, checkpoint.CHECKPOINT_DIR)
  return sorted(int(d) for d in fs.listdir(root) if d.isdigit())


def load_step(workdir, step):
  """(config, params) of one saved step, as the eval scripts read it."""
  from lit_navit import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_for_inference(
      fs.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)))


def train_arm(config, workdir):
  """Trains `config` in `workdir`; returns (trained config, params, info).

  A workdir that already holds the final step (a kept `--workdir`, e.g. one
  study reading another's models) is read back, not trained again.
  """
  from lit_navit import train  # pylint: disable=g-import-not-at-top
  if fs.isdir(workdir) and config.total_steps in checkpoint_steps(workdir):
    trained_config, params = load_step(workdir, config.total_steps)
    return trained_config, params, {'reused': workdir, **logged_stats(workdir)}
  start = time.perf_counter()
  result = train.train(config, workdir)
  trained_config, params = load_step(workdir, config.total_steps)
  # Wall-clock of the whole training call (compilation, input pipeline and
  # checkpoints included), so that equal FLOPs can be read beside it.
  info = {'train_seconds': round(time.perf_counter() - start, 1),
          'final_loss': result.final_metrics.get('loss'),
          **logged_stats(workdir)}
  return trained_config, params, info


def logged_stats(workdir) -> dict:
  """What the run logged to metrics.jsonl (every `log_every` steps and the
  last), so that the write-ups' images seen, padding and empty caption rows
  can be checked against the results JSON:

    logged_steps            the steps logged
    images_per_step         mean images a step over those steps
    images_seen_estimate    the final step times images_per_step
    padding_fraction        mean share of padding tokens in the packed rows
    empty_caption_fraction  mean share of caption rows left empty

  Empty when the workdir has no metrics.jsonl.
  """
  from lit_navit import metrics  # pylint: disable=g-import-not-at-top
  path = fs.join(workdir, metrics.JSONL)
  if not fs.isfile(path):
    return {}
  records = [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]
  records = [r for r in records if 'images' in r]
  if not records:
    return {}
  def mean(key):
    return sum(r[key] for r in records) / len(records)
  return {'logged_steps': [r['step'] for r in records],
          'images_per_step': mean('images'),
          'images_seen_estimate': round(records[-1]['step'] * mean('images')),
          'padding_fraction': mean('padding_fraction'),
          'empty_caption_fraction': mean('empty_caption_fraction')}


def heldout_source(config, num_examples):
  from lit_navit.evaluate import zero_shot  # pylint: disable=g-import-not-at-top
  return zero_shot.synthetic_heldout_source(config.input.source, num_examples)


# The eval sets of `eval_sources`, as plots and tables name them.
EVAL_METRICS = {'seen': 'seen pairs, new images', 'heldout': 'held-out pairs'}


def eval_sources(config, num_examples):
  """The two eval sets of studies 1, 2 and 4, `num_examples` images each:

    'seen'     new images (another data seed) of the 52 shape-colour pairs
               training captions name: what the model learned;
    'heldout'  images of the 12 pairs no caption names: whether it composes.

  Both are classified over all 64 pairs at the training image sizes.
  """
  from lit_navit.data import sources  # pylint: disable=g-import-not-at-top
  seen = config.input.source.copy_and_resolve_references()
  seen.update(size=num_examples, seed=seen.seed + 1, split='train')
  return {'seen': sources.make_source(seen),
          'heldout': heldout_source(config, num_examples)}


def zero_shot_top1(config, params, sources, max_tokens, batch_rows=8,
                   resize='fit', patch_size=None):
  """{name: zero-shot top-1 over every shape x colour class} for each of
  `sources`, each image resized to `max_tokens` patches of `patch_size`
  ('fit': NaFlex, aspect kept; 'square': a plain ViT's stretched square).
  """
  from lit_navit.evaluate import embed  # pylint: disable=g-import-not-at-top
  from lit_navit.evaluate import zero_shot  # pylint: disable=g-import-not-at-top
  embedder = embed.Embedder.from_config(config, params, batch_rows, resize=resize,
                                        max_tokens=max_tokens,
                                        patch_size=patch_size)
  return {name: zero_shot.synthetic_zero_shot(embedder, source)['top1']
          for name, source in sources.items()}


def zero_shot_points(config, params, sources, point, max_tokens, **kwargs):
  """`zero_shot_top1` as study points: {'SOURCE/POINT': top-1}."""
  top1 = zero_shot_top1(config, params, sources, max_tokens, **kwargs)
  return {f'{name}/{point}': value for name, value in top1.items()}


def spread(values):
  """{'mean', 'min', 'max', 'values'} of per-seed numbers."""
  return {'mean': sum(values) / len(values), 'min': min(values),
          'max': max(values), 'values': list(values)}


def run_seeds(arm_config, args, arm_name, evaluate):
  """Trains `arm_config(seed)` for each seed and calls evaluate(config,
  params, workdir) -> {point: value}; returns {'seeds': [...], 'points':
  {point: spread}}."""
  seeds = []
  for seed in range(args.seeds):
    workdir = os.path.join(args.workdir, arm_name, f'seed{seed}')
    config, params, info = train_arm(arm_config(seed), workdir)
    start = time.perf_counter()
    info['points'] = evaluate(config, params, workdir)
    info['eval_seconds'] = round(time.perf_counter() - start, 1)
    info['seed'] = seed
    print(f'{arm_name} seed {seed}: {info}', flush=True)
    seeds.append(info)
    if not args.keep_workdirs:
      fs.rmtree(workdir)
  points = seeds[0]['points'].keys()
  return {'seeds': seeds,
          'points': {p: spread([s['points'][p] for s in seeds]) for p in points}}


def markdown_table(arms, points, fmt='{:.3f}'):
  """Arms as rows, points as columns, each cell 'mean (min-max)' over seeds."""
  lines = ['| arm | ' + ' | '.join(str(p) for p in points) + ' |',
           '| --- |' + ' --- |' * len(points)]
  for name, arm in arms.items():
    cells = []
    for p in points:
      stats = arm['points'][str(p)]
      cells.append(f"{fmt.format(stats['mean'])} ({fmt.format(stats['min'])}"
                   f"-{fmt.format(stats['max'])})")
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def machine():
  """One line naming this machine: CPU model, cores, JAX backend."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}'


def summary(name, args, start, setting, arms):
  """A study's results: its name, this machine, its setting (with the shared
  flags), chance, seconds since `start` and the arms."""
  from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
  return {
      'study': name,
      'machine': machine(),
      'setting': {'seeds': args.seeds, 'scale': args.scale,
                  'eval_examples': args.eval_examples, **setting},
      'chance': 1 / len(synthetic.class_names()),
      'seconds': round(time.perf_counter() - start, 1),
      'arms': arms,
  }


def write_json(path, results):
  fs.makedirs(os.path.dirname(path) or '.')
  with fs.atomic_write(path, 'w') as f:
    json.dump(results, f, indent=2)


def line(arm, keys, xs):
  """One plot line: `xs` against the seeds' mean, min and max of the arm's
  points `keys`, and each seed's value."""
  return {'x': list(xs), **{stat: [arm['points'][k][stat] for k in keys]
                            for stat in ('mean', 'min', 'max', 'values')}}


def plot_lines(path, arms, *, xlabel, ylabel, title, chance=None, vline=None,
               vline_label=None, xscale='linear', own=None):
  """One line per arm (mean over seeds), its min-max band and a dot per seed.

  `arms`: {label: {'x': [...], 'mean': [...], 'min': [...], 'max': [...],
  'values': [[per seed], ...]}}. `own`: {label: x} marks an arm's own
  setting (a specialist's patch size) with a star. The legend sits outside
  the axes, so that it hides no band.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=150)
  xs = sorted({x for line in arms.values() for x in line['x']})
  for i, (label, line) in enumerate(arms.items()):
    drawn, = ax.plot(line['x'], line['mean'], marker='o', label=label)
    color = drawn.get_color()
    ax.fill_between(line['x'], line['min'], line['max'], alpha=0.15, color=color)
    # Seeds side by side, each arm nudged a little, so that dots stay apart.
    nudge = (i - (len(arms) - 1) / 2) * 0.006
    for x, values in zip(line['x'], line['values']):
      shifted = (x * (max(xs) / min(xs)) ** nudge if xscale == 'log'
                 else x + nudge * (max(xs) - min(xs)))
      ax.scatter([shifted] * len(values), values, s=12, color=color,
                 alpha=0.6, linewidths=0)
    if own and label in own:
      at = line['x'].index(own[label])
      ax.scatter([own[label]], [line['mean'][at]], marker='*', s=220,
                 color=color, edgecolors='black', zorder=3)
  if own:
    ax.scatter([], [], marker='*', s=120, color='white', edgecolors='black',
               label="a specialist at its own\npatch size")
  if chance is not None:
    ax.axhline(chance, color='grey', linestyle=':', label='chance')
  if vline is not None:
    ax.axvline(vline, color='black', linestyle='--', linewidth=1, label=vline_label)
  ax.set_xscale(xscale)
  if xscale == 'log' or len(xs) <= 8:  # tick the values measured, written plainly
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f'{x:g}'))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
  elif max(xs) >= 1e4:  # FLOPs: '1.4e11' at each tick, not an offset in the corner
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda x, _: f'{x:.2g}'.replace('e+', 'e')))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1), borderaxespad=0)
  fs.makedirs(os.path.dirname(path) or '.')
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


def tokens_for_side(side, patch_size):
  """Token budget of a square image `side` pixels wide."""
  return math.ceil(side / patch_size) ** 2
