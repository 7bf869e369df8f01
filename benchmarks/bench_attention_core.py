"""The attention core on CPU, ours against torch's, interleaved.

softmax(q·kᵀ/√d)·v forward and backward (the part of a transformer block
between the projections), at the image and text shapes of PEER_BASELINES'
W1 and W2. Arms, each a persistent worker (benchmarks/interleave.py):
our `dense` and `xla` attention functions (lit_navit/models/attention.py,
with the segment mask the train step passes and the trainer's default
`cpu_compiler_options`), and torch's `scaled_dot_product_attention`, which
open_clip's towers call. The core is a small share of the step's FLOPs, but
it runs at a fraction of the matmul rate: this says how much of our step's
gap to open_clip it holds. Needs the `bench` extra (torch).

  python benchmarks/bench_attention_core.py --rounds 6
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # pylint: disable=wrong-import-position

# (batch, tokens, heads, head size): the towers of W1 (B/16 + text B, batch
# 8) and W2 (S/16 + text S, batch 32), 196 image and 64 text tokens.
SHAPES = {'w1 image': (8, 196, 12, 64), 'w1 text': (8, 64, 12, 64),
          'w2 image': (32, 196, 6, 64), 'w2 text': (32, 64, 6, 64)}
ARMS = ('lit_navit dense', 'lit_navit xla', 'torch sdpa')


def core_flops(batch: int, tokens: int, heads: int, head_size: int) -> int:
  """q·kᵀ and weights·v forward, and their four products backward."""
  return 6 * 2 * batch * heads * tokens * tokens * head_size


def jax_setup(kind: str, shape: tuple):
  """(step, info): our attention function's compiled value and gradients."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lit_navit import xla_options  # pylint: disable=import-outside-toplevel
  from lit_navit.models import attention  # pylint: disable=import-outside-toplevel
  fn = attention.get(kind)
  batch, tokens = shape[:2]
  q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
  segments = jnp.ones((batch, tokens), jnp.int32)  # One image a row, as in W1/W2.
  mask = attention.segment_mask(segments, segments)
  grad = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(fn(q, k, v, mask) ** 2), argnums=(0, 1, 2)))
  compiled = xla_options.compile_step(grad.lower(q, k, v),
                                      xla_options.DEFAULT_CPU_OPTIONS, 'cpu')
  jax.block_until_ready(compiled(q, k, v))
  return (lambda: jax.block_until_ready(compiled(q, k, v)),
          {'framework': f'jax {jax.__version__}'})


def torch_setup(shape: tuple):
  """(step, info): torch's SDPA forward and backward, [B, H, L, D] as torch lays it."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  batch, tokens, heads, head_size = shape
  q, k, v = (torch.randn(batch, heads, tokens, head_size, requires_grad=True)
             for _ in range(3))

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.square().sum().backward()

  step()
  return step, {'framework': f'torch {torch.__version__}'}


def worker(arm: str, shape_name: str) -> None:
  shape = SHAPES[shape_name]
  if arm == 'torch sdpa':
    interleave.serve(lambda: torch_setup(shape))
  else:
    interleave.serve(lambda: jax_setup(arm.split()[1], shape))


def print_table(results: list) -> None:
  print('| shape (B, L, H, D) | arm | ms, median (min–max) | GFLOP/s | / torch sdpa, within round |')
  print('| --- | --- | ---: | ---: | ---: |')
  for name, shape, workers, rounds in results:
    flops = core_flops(*shape)
    for w in workers:
      s = interleave.spread(interleave.round_seconds(rounds, w.name))
      r = interleave.ratio_spread(rounds, w.name, 'torch sdpa')
      print(f"| {name} {shape} | {w.name} | {s['median'] * 1e3:.1f} "
            f"({s['min'] * 1e3:.1f}–{s['max'] * 1e3:.1f}) | {flops / s['median'] / 1e9:.0f} "
            f"| {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f}) |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default=','.join(SHAPES),
                      help=f'comma-separated, of {list(SHAPES)}')
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per arm and round')
  parser.add_argument('--worker', nargs=2, metavar=('ARM', 'SHAPE'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(*args.worker)
    return
  results = []
  for name in args.shapes.split(','):
    workers = []
    try:
      for arm in ARMS:
        workers.append(interleave.Worker(
            arm, [sys.executable, os.path.abspath(__file__), '--worker', arm, name]))
      rounds = interleave.run_rounds(workers, args.rounds, {w.name: args.steps for w in workers})
    finally:
      for w in workers:
        w.close()
    results.append((name, SHAPES[name], workers, rounds))
  print_table(results)


if __name__ == '__main__':
  main()
