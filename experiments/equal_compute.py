"""Packing at equal training compute (NaViT Fig. 1 and 4), in miniature.

Arms, all the same tiny SigLIP model on the synthetic source, patch 16:

  ViT      every image stretched to a 128 px square (8 x 8 patches), one
           image a row: the padded baseline;
  NaViT    native aspect ratio, longer side uniform on [32, 128] px, packed
           several images a row;
  NaViT + token dropping, 'beta' (mean rate 0.3 on every image) and
  'resolution' (mean rate rising with the image's tokens: 0 at one
  token, 0.4 at the largest image's 64).

Every arm gets the same training FLOPs (`models/flops.py`, both towers): the
NaViT arm's `--steps` set the budget and each other arm runs as many steps
as its own step's FLOPs allow. Each is evaluated zero-shot (over all 64
shape-colour pairs) on new images of the pairs training captions name and
on the 12 held-out pairs, at 4 points of its training (accuracy against
training FLOPs) and at the end at several token budgets per image
(accuracy against inference tokens): the ViT sees its eval images as
squares, the NaViT arms at their aspect ratio ('fit').

  python experiments/equal_compute.py            # 4 arms x 3 seeds
  python experiments/equal_compute.py --scale 4  # a bigger machine

Writes OUT/equal_compute.json and .png. A kept `--workdir` holds the models
for experiments/resolution_generalisation.py to read.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = 'equal_compute'
PATCH = 16
TRAIN_SIDE = (32, 128)
SOURCE_MAX_SIDE = 256
# Objects at the source's usual size (object_scale=0.5 learns too little in
# this budget: EXPERIMENTS.md).
OBJECT_SCALE = 1.0
# Held-out accuracy at this many points of each arm's training.
CURVE_POINTS = 4
EVAL_SIDES = (64, 96, 128, 160, 192)  # Token budgets 16 .. 144.
DEFAULT_STEPS = 250
# Per eval set (seen, held-out): accuracies near 0.1 have a standard error
# of ~0.02 on one seed.
EVAL_EXAMPLES = 192
# Caption rows per packed row: a little above the images a row holds
# (measured on this source with benchmarks/bench_pipeline.py), so that the
# text tower encodes real captions, not empty slots.
NAVIT_CAPTIONS_PER_ROW = {'none': 6.8, 'beta': 9.6, 'resolution': 8.0}


def vit(config):
  """One 128 px square a row, 64 tokens; rows doubled to keep tokens a step."""
  side = TRAIN_SIDE[1] // PATCH
  config.batch_size *= 2
  config.input.update(tokens_per_row=side * side, images_per_row=1)
  config.input.resolution.update(mode='square', max_tokens=side * side)
  config.input.captions_per_row = None


def navit(drop):
  def change(config):
    config.input.update(tokens_per_row=128, images_per_row=16,
                        captions_per_row=NAVIT_CAPTIONS_PER_ROW[drop])
    if drop == 'beta':
      config.input.token_drop.update(kind='beta', rate=0.3)
    elif drop == 'resolution':
      config.input.token_drop.update(kind='resolution', rate_min=0.0,
                                     rate_max=0.8)
  return change


# Arm name -> (config change, eval resize).
ARMS = {
    'ViT (padded square)': (vit, 'square'),
    'NaViT': (navit('none'), 'fit'),
    'NaViT + beta drop': (navit('beta'), 'fit'),
    'NaViT + resolution drop': (navit('resolution'), 'fit'),
}
REFERENCE_ARM = 'NaViT'


def base_config(steps, seed):
  return common.tiny_config(steps=steps, seed=seed, patch_size=PATCH,
                            min_side=TRAIN_SIDE[0], max_side=TRAIN_SIDE[1],
                            source_max_side=SOURCE_MAX_SIDE,
                            object_scale=OBJECT_SCALE,
                            checkpoints=CURVE_POINTS)


def arm_steps(reference_steps):
  """{arm: steps} giving every arm the FLOPs of REFERENCE_ARM's steps."""
  flops = {}
  for name, (change, _) in ARMS.items():
    config = base_config(reference_steps, 0)
    change(config)
    flops[name] = common.step_flops(config)
  budget = reference_steps * flops[REFERENCE_ARM]
  return ({name: max(1, round(budget / f)) for name, f in flops.items()},
          flops)


def arm_config(name, steps):
  change, _ = ARMS[name]
  def make(seed):
    config = base_config(steps, seed)
    change(config)
    return config
  return make


def evaluator(resize, step_flops, eval_examples, sides):
  """Held-out top-1 at each saved step (at the training budget) and, for
  the final step, at every budget of `sides`."""
  train_budget = common.tokens_for_side(TRAIN_SIDE[1], PATCH)
  def evaluate(config, params, workdir):
    sources = common.eval_sources(config, eval_examples)
    points = {}
    for step in common.checkpoint_steps(workdir):
      step_config, step_params = common.load_step(workdir, step)
      points.update(common.zero_shot_points(
          step_config, step_params, sources, f'flops/{step * step_flops:.4g}',
          train_budget, resize=resize))
    for side in sides:
      tokens = common.tokens_for_side(side, PATCH)
      points.update(common.zero_shot_points(
          config, params, sources, f'tokens/{tokens}', tokens, resize=resize))
    return points
  return evaluate


def curve(arm, prefix):
  """(x, mean, min, max) lists of an arm's points under `prefix`, e.g.
  'seen/flops/'."""
  keys = sorted((k for k in arm['points'] if k.startswith(prefix)),
                key=lambda k: float(k.rsplit('/', 1)[1]))
  return common.line(arm, keys, [float(k.rsplit('/', 1)[1]) for k in keys])


def plot(summary, out):
  """NAME.png: accuracy on seen pairs against training FLOPs; NAME_tokens.png:
  against inference tokens; NAME_heldout.png: held-out pairs against FLOPs."""
  setting = summary['setting']
  title = (f'{setting["reference_steps"]} NaViT steps of FLOPs each, '
           f'{setting["seeds"]} seeds: mean, min-max band, a dot per seed')
  arms = summary['arms']
  for suffix, metric, axis in (('', 'seen', 'flops'), ('_tokens', 'seen', 'tokens'),
                               ('_heldout', 'heldout', 'flops')):
    common.plot_lines(
        os.path.join(out, f'{NAME}{suffix}.png'),
        {name: curve(arm, f'{metric}/{axis}/') for name, arm in arms.items()},
        xlabel=('training FLOPs (models/flops.py, both towers)' if axis == 'flops'
                else 'inference tokens per image'),
        xscale='linear' if axis == 'flops' else 'log',
        ylabel=f'zero-shot top-1, {common.EVAL_METRICS[metric]}',
        title=('Equal compute' if axis == 'flops' else
               'Accuracy against inference cost') + '\n' + title,
        chance=summary['chance'])


def setting(args, sides):
  """The setting of this study's arms (studies 1 and 2 share them)."""
  return {'reference_steps': args.steps, 'patch_size': PATCH,
          'train_side': list(TRAIN_SIDE), 'object_scale': OBJECT_SCALE,
          'eval_sides': list(sides),
          'eval_tokens': [common.tokens_for_side(s, PATCH) for s in sides]}


def main(argv=None):
  args = common.parse_args(__doc__.split('\n')[0], argv, steps=DEFAULT_STEPS,
                           eval_examples=EVAL_EXAMPLES)
  sides = EVAL_SIDES if args.eval_sides is None else args.eval_sides
  steps, flops = arm_steps(args.steps)
  start = time.perf_counter()
  results = {}
  for name in common.select_arms(args, ARMS):
    resize = ARMS[name][1]
    config = arm_config(name, steps[name])(0)
    results[name] = {
        'steps': steps[name], 'step_flops': flops[name],
        'train_flops': steps[name] * flops[name], 'eval_resize': resize,
        'rows': config.batch_size, 'captions_per_row': config.input.captions_per_row,
        **common.run_seeds(arm_config(name, steps[name]), args, name,
                           evaluator(resize, flops[name], args.eval_examples,
                                     sides))}
  summary = common.summary(NAME, args, start, setting(args, sides), results)
  common.write_json(os.path.join(args.out, f'{NAME}.json'), summary)
  plot(summary, args.out)
  print(f'wrote {args.out}/{NAME}.json in {summary["seconds"]} s')
  for name, arm in results.items():
    print(f'{name}: {arm["steps"]} steps, {arm["train_flops"]:.3g} FLOPs')
  final = {name: {'points': {m: arm['points'][final_key(arm, m)] for m in common.EVAL_METRICS}}
           for name, arm in results.items()}
  print(common.markdown_table(final, list(common.EVAL_METRICS)))
  tokens = [f'seen/tokens/{common.tokens_for_side(s, PATCH)}' for s in sides]
  print(common.markdown_table(results, tokens))
  return summary


def final_key(arm, metric):
  """The point of the arm's final step on its `metric` FLOPs curve."""
  return max((k for k in arm['points'] if k.startswith(f'{metric}/flops/')),
             key=lambda k: float(k.rsplit('/', 1)[1]))


if __name__ == '__main__':
  main()
