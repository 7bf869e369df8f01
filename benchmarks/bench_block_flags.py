"""XLA CPU settings on the encoder at W1's image shape, interleaved.

Two encoder blocks (B width, 12 heads, MLP 3072) forward and backward on
8 x 196 tokens, in one persistent worker process per setting (its XLA_FLAGS),
timed round by round (benchmarks/interleave.py); each setting's within-round
ratio to the first one is reported. Cheap enough to try flags before a full
`bench_train.py --peers --our-env 'XLA_FLAGS=...'` run on the train step.

  python benchmarks/bench_block_flags.py --rounds 6 \\
      --setting default= --setting 'ynn off=--xla_cpu_experimental_ynn_fusion_type='
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # pylint: disable=wrong-import-position


def setup():
  """(step, info) for interleave.serve: the blocks' compiled value and grad."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lit_navit.models import encoder  # pylint: disable=import-outside-toplevel
  model = encoder.Encoder(depth=2, mlp_dim=3072, num_heads=12, scan=False)
  x = jax.random.normal(jax.random.key(0), (8, 196, 768))
  params = model.init(jax.random.key(1), x, None)
  step = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x, None) ** 2)))
  compiled = step.lower(params).compile()
  jax.block_until_ready(compiled(params))
  return (lambda: jax.block_until_ready(compiled(params)),
          {'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'ynn_fusions': compiled.as_text().count('ynn_fusion')})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--setting', action='append', required=False,
                      help="NAME=XLA_FLAGS (repeat); the first is the baseline")
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=2, help='timed steps per round')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    interleave.serve(setup)
    return
  settings = [s.partition('=')[::2] for s in args.setting or ['default=']]
  workers = []
  try:
    for name, flags in settings:
      workers.append(interleave.Worker(
          name, [sys.executable, os.path.abspath(__file__), '--worker'],
          {'XLA_FLAGS': flags}))
    rounds = interleave.run_rounds(workers, args.rounds,
                                   {w.name: args.steps for w in workers})
  finally:
    for worker in workers:
      worker.close()
  baseline = workers[0].name
  print(json.dumps({w.name: {
      'info': w.info,
      'seconds': interleave.spread(interleave.round_seconds(rounds, w.name)),
      f'over {baseline}': interleave.ratio_spread(rounds, w.name, baseline)}
                    for w in workers}, indent=2))


if __name__ == '__main__':
  main()
