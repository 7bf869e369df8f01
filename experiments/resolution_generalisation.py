"""Resolution generalisation (NaViT Fig. 6/7), in miniature.

The arms of experiments/equal_compute.py (a ViT trained on 128 px squares,
NaViT trained at native aspect with its longer side on [32, 128] px, with
and without token dropping), evaluated zero-shot on the held-out
shape-colour pairs at resolutions below, inside and above their training
range: 32 to 256 px, square-equivalent (a token budget of (S/16)^2; the ViT
sees stretched squares, NaViT the aspect ratio, as each was trained).

  python experiments/resolution_generalisation.py   # trains the arms: ~20 min
  python experiments/equal_compute.py --workdir /tmp/arms
  python experiments/resolution_generalisation.py --workdir /tmp/arms  # reads them

Writes OUT/resolution_generalisation.json and .png.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import equal_compute  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = 'resolution_generalisation'
PATCH = equal_compute.PATCH
EVAL_SIDES = (32, 64, 96, 128, 160, 192, 256)


def evaluator(resize, eval_examples, sides):
  def evaluate(config, params, workdir):  # pylint: disable=unused-argument
    sources = common.eval_sources(config, eval_examples)
    points = {}
    for side in sides:
      points.update(common.zero_shot_points(
          config, params, sources, side, common.tokens_for_side(side, PATCH),
          resize=resize))
    return points
  return evaluate


def plot(summary, out):
  """NAME.png (seen pairs) and NAME_heldout.png: accuracy against eval
  resolution, one line per arm."""
  sides = summary['setting']['eval_sides']
  setting = summary['setting']
  for metric, suffix in (('seen', ''), ('heldout', '_heldout')):
    lines = {name: common.line(arm, [f'{metric}/{s}' for s in sides], sides)
             for name, arm in summary['arms'].items()}
    common.plot_lines(
        os.path.join(out, f'{NAME}{suffix}.png'), lines,
        xlabel=f'eval resolution (px, square-equivalent; patch {PATCH})',
        ylabel=f'zero-shot top-1, {common.EVAL_METRICS[metric]}',
        title=f'Trained at <= {equal_compute.TRAIN_SIDE[1]} px, equal FLOPs\n'
              f'{setting["seeds"]} seeds: mean, min-max band, a dot per seed',
        chance=summary['chance'], vline=equal_compute.TRAIN_SIDE[1],
        vline_label=f'the ViT\'s training size ({equal_compute.TRAIN_SIDE[1]} px square);\n'
                    f'NaViT: longer side <= {equal_compute.TRAIN_SIDE[1]} px')


def main(argv=None):
  args = common.parse_args(__doc__.split('\n')[0], argv,
                           steps=equal_compute.DEFAULT_STEPS,
                           eval_examples=equal_compute.EVAL_EXAMPLES)
  sides = EVAL_SIDES if args.eval_sides is None else args.eval_sides
  steps, _ = equal_compute.arm_steps(args.steps)
  start = time.perf_counter()
  results = {}
  for name in common.select_arms(args, equal_compute.ARMS):
    resize = equal_compute.ARMS[name][1]
    results[name] = {
        'steps': steps[name], 'eval_resize': resize,
        **common.run_seeds(equal_compute.arm_config(name, steps[name]), args,
                           name, evaluator(resize, args.eval_examples, sides))}
  summary = common.summary(NAME, args, start,
                           equal_compute.setting(args, sides), results)
  json_path = os.path.join(args.out, f'{NAME}.json')
  common.write_json(json_path, summary)
  plot(summary, args.out)
  print(f'wrote {json_path} in {summary["seconds"]} s')
  for metric in common.EVAL_METRICS:
    print(common.markdown_table(results, [f'{metric}/{s}' for s in sides]))
  return summary


if __name__ == '__main__':
  main()
