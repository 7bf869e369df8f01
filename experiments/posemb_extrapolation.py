"""Position-embedding extrapolation (NaViT Fig. 10a), in miniature.

Every arm trains the same tiny SigLIP NaViT on the synthetic shapes source
with images' longer side uniform on [32, 128] px (patch 16: at most 8
patches a side), and differs only in `model.image.posemb`. Each is then
evaluated zero-shot on the held-out shape-colour pairs with images resized
to fill a token budget (NaFlex 'fit') of a square 64..256 px wide: below,
inside and up to 2x beyond the training range.

  python experiments/posemb_extrapolation.py            # 4 arms x 3 seeds
  python experiments/posemb_extrapolation.py --scale 4  # a bigger machine

Writes OUT/posemb_extrapolation.json and .png.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = 'posemb_extrapolation'
PATCH = 16
TRAIN_MAX_SIDE = 128
EVAL_SIDES = (64, 96, 128, 160, 192, 256)
# Arm name -> models/posemb.py kind.
ARMS = {
    'factorized learned': 'learn_factorized',
    'fractional': 'fractional_factorized',
    'sincos': 'sincos2d',
    'NaFlex learned-2D resized': 'learn_2d_resized',
}
DEFAULT_STEPS = 250  # ~70 s an arm-seed on 2 CPU cores: 4 x 3 fit 20 minutes


def arm_config(kind, steps):
  def make(seed):
    config = common.tiny_config(steps=steps, seed=seed, patch_size=PATCH,
                                max_side=TRAIN_MAX_SIDE,
                                source_max_side=max(EVAL_SIDES))
    config.model.image.posemb = kind
    # Tables cover the largest eval grid; rows past the training grid are
    # what 'factorized learned' must extrapolate into.
    config.model.image.max_grid = max(EVAL_SIDES) // PATCH
    return config
  return make


def evaluator(eval_examples, sides):
  def evaluate(config, params, workdir):  # pylint: disable=unused-argument
    sources = {'heldout': common.heldout_source(config, eval_examples)}
    return {str(side): common.zero_shot_top1(
        config, params, sources, common.tokens_for_side(side, PATCH))['heldout']
            for side in sides}
  return evaluate


def plot(summary, path):
  """Accuracy against eval resolution, one line per arm, from the JSON."""
  sides = summary['setting']['eval_sides']
  lines = {name: common.line(arm, [str(s) for s in sides], sides)
           for name, arm in summary['arms'].items()}
  setting = summary['setting']
  common.plot_lines(
      path, lines,
      xlabel=f'eval resolution (px, square-equivalent; patch {PATCH})',
      ylabel='zero-shot top-1, held-out pairs',
      title=f'Position embeddings trained at side <= {TRAIN_MAX_SIDE} px\n'
            f'{setting["steps"]} steps, {setting["seeds"]} seeds: mean, min-max band, a dot per seed',
      chance=summary['chance'], vline=TRAIN_MAX_SIDE,
      vline_label=f'budget of a {TRAIN_MAX_SIDE} px square; training:\n'
                  f'longer side <= {TRAIN_MAX_SIDE} px')


def main(argv=None):
  args = common.parse_args(__doc__.split('\n')[0], argv, steps=DEFAULT_STEPS)
  sides = EVAL_SIDES if args.eval_sides is None else args.eval_sides
  arms = common.select_arms(args, ARMS)
  start = time.perf_counter()
  evaluate = evaluator(args.eval_examples, sides)
  results = {name: {'posemb': kind, **common.run_seeds(
      arm_config(kind, args.steps), args, name, evaluate)}
             for name, kind in arms.items()}
  summary = common.summary(NAME, args, start, {
      'steps': args.steps, 'patch_size': PATCH,
      'train_side': [32, TRAIN_MAX_SIDE],
      'eval_sides': list(sides),
      'eval_tokens': [common.tokens_for_side(s, PATCH) for s in sides],
      'eval_resize': 'fit',
  }, results)
  json_path = os.path.join(args.out, f'{NAME}.json')
  common.write_json(json_path, summary)
  plot(summary, os.path.join(args.out, f'{NAME}.png'))
  print(f'wrote {json_path} in {summary["seconds"]} s')
  print(common.markdown_table(results, sides))
  return summary


if __name__ == '__main__':
  main()
