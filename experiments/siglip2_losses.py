"""SigLIP 2's added losses (arXiv 2502.14786), in miniature, at equal compute.

Four arms, each adding one of SigLIP 2's objectives to the one before, as
the paper stacks them:

  sigmoid            the SigLIP loss alone
  +decoder           a LocCa captioning decoder on the image tokens
  +self-distill      SILC-style: an EMA teacher's global views against the
                     student's local crops, from 80% of training on
  +masked            TIPS-style masked prediction of the teacher's patch
                     features, from 80% of training on

and one beside the stack: +decoder+boxes, the decoder also trained on
LocCa's referring expressions and grounded captions of the shapes' boxes.

Every arm trains on the same budget of training FLOPs (`models/flops.py`,
teacher and decoder included): an arm whose steps cost more takes fewer.
Each is evaluated zero-shot (seen and held-out shape-colour pairs), by
image-text recall@1 on the held-out pairs, and on its dense features: a
linear probe of the encoder's patch tokens (before pooling) for the object's
colour map, where each patch's label is the colour of the object covering
most of it or 'background' (ridge regression on new images of the seen
pairs, fitted on half of them, accuracy on the other half, over object
patches and over all).

  python experiments/siglip2_losses.py            # 5 arms x 3 seeds
  python experiments/siglip2_losses.py --scale 4  # a bigger machine
  python experiments/siglip2_losses.py --equal_steps  # control: equal data

Writes OUT/siglip2_losses.json (OUT/siglip2_losses_equal_steps.json).
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = 'siglip2_losses'
DEFAULT_STEPS = 100   # the budget: this many steps of the most costly arm
START_FRACTION = 0.8  # SigLIP 2: self-distillation and masking in the last 20%
PROBE_SIDE = 128      # probe images, stretched to a square of 8 x 8 patches
PROBE_IMAGES = 96
EVAL_TOKENS = 16


def _decoder(config):
  config.model.decoder.update(weight=1.0, width=32, depth=1, mlp_dim=128, num_heads=2)


def _teacher_heads(config):
  config.model.distill.head.update(hidden_dim=256, bottleneck_dim=64, prototypes=1024)


def _self_distill(config):
  config.model.distill.weight = 1.0
  config.input.local_crops.update(count=2, max_tokens=4)
  _teacher_heads(config)


def _boxes(config):
  """LocCa's referring expressions and grounded captioning on the synthetic
  shapes' boxes, beside the captions."""
  config.input.box_tasks = True
  config.model.decoder.box_weight = 1.0


def _masked(config):
  config.model.distill.masked_weight = 1.0
  config.input.mask_ratio = 0.5
  _teacher_heads(config)


ARMS = {
    'sigmoid': (),
    '+decoder': (_decoder,),
    '+self-distill': (_decoder, _self_distill),
    '+masked': (_decoder, _self_distill, _masked),
    # Off the stack: the decoder with LocCa's box tasks, beside +decoder.
    '+decoder+boxes': (_decoder, _boxes),
}


def base_config(steps, seed, changes):
  config = common.tiny_config(steps=steps, seed=seed)
  # The demo's caption places a row, not one a slot: the decoder reads every
  # caption place, empty or not.
  config.input.captions_per_row = 7.5
  for change in changes:
    change(config)
  config.model.distill.start_step = int(START_FRACTION * steps)
  return config


def step_flops(config, distilling: bool) -> float:
  """Training FLOPs of one step (`models/flops.py`: towers, decoder and,
  `distilling`, the teacher's forward and the masked pass)."""
  from lit_navit.data import pipeline  # pylint: disable=g-import-not-at-top
  from lit_navit.models import flops  # pylint: disable=g-import-not-at-top
  spec = pipeline.batch_spec(config.input, rows=config.batch_size, groups=1,
                             patch_size=config.input.patch_sizes[0])
  return flops.training_flops(config.model, spec, distilling=distilling)


def run_flops(changes, steps) -> float:
  """Training FLOPs of a whole run: before the start step without the
  teacher's objectives, after it with them."""
  config = base_config(steps, 0, changes)
  start = config.model.distill.start_step
  return (start * step_flops(config, False)
          + (steps - start) * step_flops(config, True))


def steps_at_budget(changes, budget) -> int:
  """The steps whose run, its phases included, costs closest to `budget` FLOPs."""
  guess = max(1, round(budget * 1000 / run_flops(changes, 1000)))
  candidates = range(max(1, guess - 3), guess + 4)
  return min(candidates, key=lambda steps: abs(run_flops(changes, steps) - budget))


def arm_config(changes, steps):
  return lambda seed: base_config(steps, seed, changes)


def colour_map(attributes, grid, side):
  """Per-patch labels [grid, grid]: 1 + the object's colour index where the
  object covers most of the patch, else 0, for the image stretched to `side`."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
  mask = Image.new('L', (attributes['width'], attributes['height']), 0)
  synthetic._draw_shape(ImageDraw.Draw(mask), dict(attributes, rgb=255))  # pylint: disable=protected-access
  cover = np.asarray(mask.resize((side, side), Image.BILINEAR), np.float32) / 255
  patch = side // grid
  cover = cover.reshape(grid, patch, grid, patch).mean(axis=(1, 3))
  colour = 1 + synthetic.COLOURS.index(attributes['colour'])
  return np.where(cover > 0.5, colour, 0)


def patch_tokens(config, params, source, indices, side):
  """Encoder outputs [N, grid*grid, width] of images stretched to `side`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lit_navit.data import decode  # pylint: disable=g-import-not-at-top
  from lit_navit.data import patches as patches_lib  # pylint: disable=g-import-not-at-top
  from lit_navit.models import two_towers  # pylint: disable=g-import-not-at-top
  p = config.input.patch_sizes[0]
  grid = side // p
  pixels, yx = [], []
  for i in indices:
    image = decode.decode_image(source[i].image)
    cut = patches_lib.patchify(patches_lib.resize_image(image, (side, side)), p)
    pixels.append(cut.pixels)
    yx.append(cut.yx)
  n = len(indices)
  tower = two_towers.image_tower(config.model)
  _, tokens = jax.jit(lambda img: tower.apply(
      {'params': img}, jnp.asarray(np.stack(pixels)), jnp.asarray(np.stack(yx)),
      jnp.ones((n, grid * grid), jnp.int32), jnp.full((n, 1, 2), grid, jnp.int32),
      return_tokens=True))(params['img'])
  return np.asarray(tokens, np.float64)


def dense_probe(config, params, num_images, side=PROBE_SIDE):
  """Colour-map probe accuracy of the patch tokens: {'all', 'object'}."""
  from lit_navit.data import synthetic  # pylint: disable=g-import-not-at-top
  # New images of the pairs training saw.
  source = common.eval_sources(config, num_images)['seen']
  indices = list(range(len(source)))
  grid = side // config.input.patch_sizes[0]
  features = patch_tokens(config, params, source, indices, side)
  labels = np.stack([colour_map(source.attributes(i), grid, side) for i in indices])
  # Images sorted by colour go to the fit and test halves in turn, so each
  # colour is in both.
  order = np.argsort([source.attributes(i)['colour'] for i in indices], kind='stable')
  halves = [order[0::2], order[1::2]]
  x, y = [], []
  for half in halves:
    f = features[half].reshape(-1, features.shape[-1])
    x.append(np.concatenate([f, np.ones((len(f), 1))], axis=1))
    y.append(labels[half].reshape(-1))
  classes = 1 + len(synthetic.COLOURS)
  gram = x[0].T @ x[0]
  weights = np.linalg.solve(gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram)),
                            x[0].T @ np.eye(classes)[y[0]])
  predicted = np.argmax(x[1] @ weights, axis=1)
  test = y[1]
  on_object = test > 0
  return {'all': float(np.mean(predicted == test)),
          'object': float(np.mean(predicted[on_object] == test[on_object]))}


def evaluator(eval_examples):
  def evaluate(config, params, workdir):  # pylint: disable=unused-argument
    from lit_navit.evaluate import demo_eval  # pylint: disable=g-import-not-at-top
    points = common.zero_shot_points(config, params, common.eval_sources(
        config, eval_examples), 'zero_shot', EVAL_TOKENS)
    metrics = demo_eval.synthetic_metrics(config, params, eval_examples)
    points['retrieval/image_to_text_r1'] = metrics['retrieval/image_to_text/R@1']
    points['retrieval/text_to_image_r1'] = metrics['retrieval/text_to_image/R@1']
    probe = dense_probe(config, params, PROBE_IMAGES)
    points['dense_probe/object'] = probe['object']
    points['dense_probe/all'] = probe['all']
    return points
  return evaluate


POINTS = ('seen/zero_shot', 'heldout/zero_shot', 'retrieval/image_to_text_r1',
          'retrieval/text_to_image_r1', 'dense_probe/object', 'dense_probe/all')


def main(argv=None):
  args = common.parse_args(__doc__.split('\n')[0], argv, steps=DEFAULT_STEPS,
                           extra_flags=[('--equal_steps', dict(
                               action='store_true',
                               help='a control: every arm trains --steps steps '
                                    '(equal data, not equal compute)'))])
  arms = common.select_arms(args, ARMS)
  start = time.perf_counter()
  budget = run_flops(ARMS['+masked'], args.steps)
  evaluate = evaluator(args.eval_examples)
  results = {}
  for name, changes in arms.items():
    steps = args.steps if args.equal_steps else steps_at_budget(changes, budget)
    results[name] = {'steps': steps, 'run_flops': run_flops(changes, steps),
                     **common.run_seeds(arm_config(changes, steps), args, name, evaluate)}
  name = f'{NAME}_equal_steps' if args.equal_steps else NAME
  summary = common.summary(name, args, start, {
      'budget': 'steps' if args.equal_steps else 'flops',
      'budget_flops': budget, 'budget_steps_of': '+masked',
      'start_fraction': START_FRACTION, 'probe_side': PROBE_SIDE,
      'probe_images': PROBE_IMAGES, 'eval_tokens': EVAL_TOKENS}, results)
  json_path = os.path.join(args.out, f'{name}.json')
  common.write_json(json_path, summary)
  print(f'wrote {json_path} in {summary["seconds"]} s')
  print(common.markdown_table(results, POINTS))
  return summary


if __name__ == '__main__':
  main()
