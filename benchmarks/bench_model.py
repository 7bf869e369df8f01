"""Forward+backward time of the NaViT image tower: packed vs unmasked vs one image per row.

Three runs over the same images, measured in one process:
  packed        B rows of L tokens, several images per row, segment-masked attention;
  packed_nomask the same tokens with the attention mask dropped (the cost of masking);
  one_per_row   each image alone in a row padded to L (what packing saves: same
                images, more rows).

  python benchmarks/bench_model.py                 # Ti/16, CPU-sized
  python benchmarks/bench_model.py --variant B/16 --rows 32 --json
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lit_navit.data import packing
from lit_navit.models import attention
from lit_navit.models import two_towers
from lit_navit.models import variants


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='Ti/16', help="image variant, e.g. 'B/16'")
  parser.add_argument('--rows', type=int, default=4, help='B of the packed batch')
  parser.add_argument('--tokens', type=int, default=256, help='L, tokens per row')
  parser.add_argument('--slots', type=int, default=8, help='E, images per row at most')
  parser.add_argument('--side', type=int, nargs=2, default=(3, 12),
                      help='image side range in patches (uniform)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--iters', type=int, default=5, help='timed steps per run')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  return parser.parse_args()


def sample_grids(rng, count, side):
  return [tuple(rng.integers(side[0], side[1] + 1, size=2)) for _ in range(count)]


def build_batch(rows_of_grids, tokens_per_row, slots, patch_dim, rng):
  """Image inputs (patches, yx, segment, grid) of rows of image grids, per the contract."""
  rows = len(rows_of_grids)
  patches = np.zeros((rows, tokens_per_row, patch_dim), np.float32)
  yx = np.zeros((rows, tokens_per_row, 2), np.int32)
  segment = np.zeros((rows, tokens_per_row), np.int32)
  grid = np.zeros((rows, slots, 2), np.int32)
  for r, grids in enumerate(rows_of_grids):
    start = 0
    for k, (h, w) in enumerate(grids):
      end = start + h * w
      patches[r, start:end] = rng.uniform(-1, 1, (h * w, patch_dim))
      yx[r, start:end] = np.stack(np.divmod(np.arange(h * w), w), -1)
      segment[r, start:end] = k + 1
      grid[r, k] = (h, w)
      start = end
  return patches, yx, segment, grid


def unmasked_attention(q, k, v, mask):
  del mask
  return attention.dense_attention(q, k, v)


def compile_step(model, inputs):
  """A jitted forward+backward of `model` on `inputs`, compiled and warmed up."""
  params = jax.jit(model.init)(jax.random.key(0), *inputs)
  loss = lambda params: jnp.sum(model.apply(params, *inputs) ** 2)
  step = jax.jit(jax.grad(loss))
  jax.block_until_ready(step(params))
  return lambda: jax.block_until_ready(step(params))


def median_seconds(steps: dict, iters: int) -> dict:
  """Median wall time of each step, timed round-robin so load drifts hit all alike.

  Each timed call follows an untimed one of the same step: a step run right
  after a bigger one measures ~30% slow on CPU (memory given back and
  re-faulted), which would bias whichever step follows the largest.
  """
  times = {name: [] for name in steps}
  for _ in range(iters):
    for name, step in steps.items():
      step()
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  args = parse_args()
  rng = np.random.default_rng(args.seed)
  config = two_towers.default_config()
  config.image.variant = args.variant
  config.dtype = args.dtype
  p = two_towers.base_patch_size(config.image)
  patch_dim = p * p * 3
  config.embed_dim = variants.decode(args.variant)['width']

  grids = sample_grids(rng, 4 * args.rows * args.slots, args.side)
  plan = packing.plan_rows([h * w for h, w in grids], args.rows, args.tokens, args.slots)
  packed_rows = [[grids[i] for i in row] for row in plan]
  placed = [g for row in packed_rows for g in row]

  packed = build_batch(packed_rows, args.tokens, args.slots, patch_dim, rng)
  one_per_row = build_batch([[g] for g in placed], args.tokens, 1, patch_dim, rng)
  masked_model = two_towers.image_tower(config)
  unmasked_model = masked_model.clone(attention=unmasked_attention)

  runs = {
      'packed': (masked_model, packed),
      'packed_nomask': (unmasked_model, packed),
      'one_per_row': (masked_model, one_per_row),
  }
  seconds = median_seconds(
      {name: compile_step(model, inputs) for name, (model, inputs) in runs.items()},
      args.iters)
  results = {name: dict(rows=inputs[0].shape[0], images=len(placed),
                        seconds=seconds[name])
             for name, (_, inputs) in runs.items()}
  for r in results.values():
    r['ratio_to_packed'] = r['seconds'] / results['packed']['seconds']
    r['images_per_s'] = r['images'] / r['seconds']

  summary = dict(
      variant=args.variant, dtype=args.dtype, tokens_per_row=args.tokens,
      slots=args.slots, patch_size=p, device=str(jax.devices()[0].platform),
      real_token_fraction=sum(h * w for h, w in placed) / (args.rows * args.tokens),
      runs=results)
  if args.json:
    print(json.dumps(summary, indent=2))
    return
  print(f"{args.variant} {args.dtype} on {summary['device']}: L={args.tokens}, "
        f"E={args.slots}, {len(placed)} images, "
        f"{summary['real_token_fraction']:.1%} of packed tokens real; "
        f"median of {args.iters} forward+backward steps")
  print(f"{'run':<15}{'rows':>6}{'median ms':>12}{'images/s':>11}{'x packed':>10}")
  for name, r in results.items():
    print(f"{name:<15}{r['rows']:>6}{1e3 * r['seconds']:>12.1f}"
          f"{r['images_per_s']:>11.1f}{r['ratio_to_packed']:>10.2f}")


if __name__ == '__main__':
  main()
