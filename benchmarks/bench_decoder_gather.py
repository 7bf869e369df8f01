"""Step time of the decoder's gathered cross-attention against the old
group-wide masked one, on CPU.

One jitted loss-and-gradient step of the whole model (both towers and the
decoder, trainer `_loss`) on a batch of experiments/siglip2_losses.py's
'+decoder' arm (experiments/common.py tiny_config), once with the gathered
cross-attention (decoder.gathered_attention) and once with the old
formulation (every caption token against all its group's image tokens,
masked by group-wide ids), which lives only in tests/test_decoder_gather.py
as the reference and is swapped in while tracing. The two alternate step by
step, so both see the same machine state; prints the median of each.

  python benchmarks/bench_decoder_gather.py [--steps 10]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import siglip2_losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from lit_navit import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from lit_navit import trainer as trainer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lit_navit.models import decoder  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_decoder_gather  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  config = common.tiny_config(steps=10, seed=0)
  siglip2_losses._decoder(config)  # pylint: disable=protected-access
  trainer = trainer_lib.Trainer(config, tempfile.mkdtemp())
  try:
    batch = sharding.make_global_batch(
        trainer_lib.model_inputs(next(trainer.pipeline)), trainer.mesh)
  finally:
    trainer.pipeline.close()
  params = trainer._init_fn()['params']  # pylint: disable=protected-access
  loss = lambda params, batch: trainer._loss(params, batch, 1)[0]  # pylint: disable=protected-access

  def old_loss(params, batch):
    gathered = decoder.gathered_attention
    decoder.gathered_attention = test_decoder_gather.old_attention(
        test_decoder_gather.old_cross_ids(batch, with_boxes=False))
    try:
      return loss(params, batch)
    finally:
      decoder.gathered_attention = gathered

  steps = {'gathered': jax.jit(jax.value_and_grad(loss)),
           'old masked': jax.jit(jax.value_and_grad(old_loss))}
  print('image rows', batch['image/patches'].shape[:2], 'caption rows',
        batch['text/tokens'].shape)
  for name, step in steps.items():  # compile, and the losses agree
    print(f'{name}: loss {float(step(params, batch)[0]):.6f}')
  times = {name: [] for name in steps}
  for i in range(args.steps):
    for name in (list(steps) if i % 2 else list(steps)[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(steps[name](params, batch))
      times[name].append(time.perf_counter() - start)
  for name, seconds in times.items():
    print(f'{name}: median step {1e3 * statistics.median(seconds):.1f} ms '
          f'over {args.steps}')


if __name__ == '__main__':
  main()
