"""FlexiViT (arXiv 2212.08013, Fig. 3), in miniature.

One model trained with a patch size drawn per step from {8, 12, 16, 24}
(its patch embedding PI-resized from 16, its learned 2-D position embedding
resized to each grid) against the same model trained at one patch size
each. Every arm trains on the synthetic source, images' longer side at
96 px, one image a row (32 a step, whatever the patch size), and is then
evaluated zero-shot on new images of the seen shape-colour pairs and on
the held-out pairs at every patch size, images at 96 px square-equivalent
('fit' to (96/p)^2 tokens: 144 at p=8 down to 16 at p=24).

  python experiments/flexivit.py            # 4 arms x 3 seeds
  python experiments/flexivit.py --scale 4  # a bigger machine

Writes OUT/flexivit.json and .png.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = 'flexivit'
SIDE = 96
PATCH_SIZES = (8, 12, 16, 24)
BASE_PATCH = 16
OBJECT_SCALE = 1.0
# Arm name -> training patch sizes.
ARMS = {
    'FlexiViT (8-24)': PATCH_SIZES,
    'ViT-8': (8,),
    'ViT-16': (16,),
    'ViT-24': (24,),
}
DEFAULT_STEPS = 250
IMAGES_PER_STEP = 32
# Per eval set (seen, held-out): accuracies near 0.1 have a standard error
# of ~0.02 on one seed.
EVAL_EXAMPLES = 192


def arm_config(patch_sizes, steps):
  def make(seed):
    config = common.tiny_config(steps=steps, seed=seed, patch_size=BASE_PATCH,
                                min_side=SIDE, max_side=SIDE,
                                object_scale=OBJECT_SCALE)
    config.input.patch_sizes = tuple(patch_sizes)
    # One image a row, as FlexiViT trains: every step sees 32 images at any
    # patch size. (Packed rows would hold 1 image at p=8 and 6 at p=24, and
    # the batch size would then follow the patch size: EXPERIMENTS.md.)
    config.batch_size = IMAGES_PER_STEP
    config.input.update(tokens_per_row=(SIDE // min(PATCH_SIZES)) ** 2,
                        images_per_row=1, captions_per_row=None)
    config.model.image.posemb = 'learn_2d_resized'
    return config
  return make


def evaluator(eval_examples, patch_sizes):
  def evaluate(config, params, workdir):  # pylint: disable=unused-argument
    sources = common.eval_sources(config, eval_examples)
    points = {}
    for p in patch_sizes:
      points.update(common.zero_shot_points(
          config, params, sources, p, common.tokens_for_side(SIDE, p), patch_size=p))
    return points
  return evaluate


def plot(summary, out):
  """NAME.png (seen pairs) and NAME_heldout.png: accuracy against eval patch
  size, one line per arm."""
  sizes = summary['setting']['eval_patch_sizes']
  setting = summary['setting']
  for metric, suffix in (('seen', ''), ('heldout', '_heldout')):
    lines = {name: common.line(arm, [f'{metric}/{p}' for p in sizes], sizes)
             for name, arm in summary['arms'].items()}
    common.plot_lines(
        os.path.join(out, f'{NAME}{suffix}.png'), lines,
        xlabel=f'eval patch size (images at {SIDE} px)',
        ylabel=f'zero-shot top-1, {common.EVAL_METRICS[metric]}',
        title=f'FlexiViT against single patch sizes\n{setting["steps"]} steps, '
              f'{setting["seeds"]} seeds: mean, min-max band, a dot per seed',
        chance=summary['chance'],
        own={name: arm['patch_sizes'][0] for name, arm in summary['arms'].items()
             if len(arm['patch_sizes']) == 1})


def main(argv=None):
  args = common.parse_args(__doc__.split('\n')[0], argv, steps=DEFAULT_STEPS,
                           eval_examples=EVAL_EXAMPLES)
  arms = common.select_arms(args, ARMS)
  start = time.perf_counter()
  evaluate = evaluator(args.eval_examples, PATCH_SIZES)
  results = {name: {'patch_sizes': list(sizes), **common.run_seeds(
      arm_config(sizes, args.steps), args, name, evaluate)}
             for name, sizes in arms.items()}
  summary = common.summary(NAME, args, start, {
      'steps': args.steps, 'side': SIDE,
      'base_patch_size': BASE_PATCH, 'object_scale': OBJECT_SCALE,
      'eval_patch_sizes': list(PATCH_SIZES),
      'eval_tokens': [common.tokens_for_side(SIDE, p) for p in PATCH_SIZES],
  }, results)
  json_path = os.path.join(args.out, f'{NAME}.json')
  common.write_json(json_path, summary)
  plot(summary, args.out)
  print(f'wrote {json_path} in {summary["seconds"]} s')
  for metric in common.EVAL_METRICS:
    print(common.markdown_table(results, [f'{metric}/{p}' for p in PATCH_SIZES]))
  return summary


if __name__ == '__main__':
  main()
