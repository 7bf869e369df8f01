"""Memory and step time of the sharded contrastive losses on simulated devices.

Compares the ring sigmoid loss, the all-gather sigmoid loss and the sharded
softmax loss (value and gradient wrt both embeddings, t and b):

  1. over global batches of 1k to 32k on 8 devices: per-device memory from
     the compiled executable's memory_analysis() (temporaries, and with the
     arguments and outputs) and the median time per step. Timing is skipped
     above --time_up_to: at 32k the gathered losses' b x N logits need
     12 GB (all-gather) and 25 GB (softmax) of host memory for 8 simulated
     devices; time the ring alone there with
     `--losses sigmoid --batches 32768 --time_up_to 32768`;
  2. at a fixed per-device batch on 1, 2, 4 and 8 devices (sub-meshes):
     per-device memory, which for the ring should stay flat.

  python benchmarks/bench_losses.py            # tables
  python benchmarks/bench_losses.py --json     # the same figures as JSON
"""

import os

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
if _DEVICE_COUNT_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' {_DEVICE_COUNT_FLAG}=8')

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lit_navit import losses
from lit_navit import sharding

LOSSES = ('sigmoid', 'sigmoid_allgather', 'softmax')
MIB = 2 ** 20


def make_mesh(devices):
  config = ml_collections.ConfigDict({'mesh': [('data', devices), ('fsdp', 1)]})
  return sharding.make_mesh(config, jax.devices()[:devices])


def train_step(name, mesh):
  """jit(value and gradient) of the loss wrt zimg, ztxt, t_log and b."""
  loss_fn = losses.make_loss(name, mesh)
  return jax.jit(jax.value_and_grad(
      lambda *args: loss_fn(*args)[0], argnums=(0, 1, 3, 4)))


def abstract_inputs(batch, dim, mesh):
  rows = sharding.batch_sharding(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  embedding = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
  valid = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows)
  return embedding, embedding, valid, scalar, scalar


def random_inputs(batch, dim, mesh, seed=0):
  rng = np.random.default_rng(seed)
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  zimg = normalise(rng.normal(size=(batch, dim))).astype(np.float32)
  ztxt = normalise(zimg + rng.normal(size=(batch, dim))).astype(np.float32)
  local = {'zimg': zimg, 'ztxt': ztxt, 'valid': rng.random(batch) < 0.9}
  placed = sharding.make_global_batch(local, mesh)
  return (placed['zimg'], placed['ztxt'], placed['valid'], jnp.float32(2.3),
          jnp.float32(-10.0))


def measure(name, batch, dim, mesh, repeats, timed):
  """One table row: per-device memory and, if `timed`, median step time."""
  step = train_step(name, mesh)
  compiled = step.lower(*abstract_inputs(batch, dim, mesh)).compile()
  memory = compiled.memory_analysis()
  row = {
      'loss': name, 'devices': mesh.size, 'global_batch': batch,
      'per_device_batch': batch // mesh.size,
      'temp_mib': memory.temp_size_in_bytes / MIB,
      'total_mib': (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                    + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes) / MIB,
      'step_ms': None,
  }
  if timed:
    inputs = random_inputs(batch, dim, mesh)
    jax.block_until_ready(step(*inputs))  # Compile and warm up.
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(*inputs))
      times.append(time.perf_counter() - start)
    row['step_ms'] = 1e3 * statistics.median(times)
  return row


def print_table(title, rows):
  print(f'\n{title}')
  print(f"{'loss':<18} {'devices':>7} {'global':>7} {'per dev':>7} "
        f"{'temp MiB':>9} {'total MiB':>9} {'step ms':>9}")
  for r in rows:
    step = '-' if r['step_ms'] is None else f"{r['step_ms']:.1f}"
    print(f"{r['loss']:<18} {r['devices']:>7} {r['global_batch']:>7} "
          f"{r['per_device_batch']:>7} {r['temp_mib']:>9.2f} "
          f"{r['total_mib']:>9.2f} {step:>9}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--losses', default=','.join(LOSSES),
                      help='names for losses.make_loss')
  parser.add_argument('--batches', default='1024,2048,4096,8192,16384,32768',
                      help='global batch sizes on 8 devices')
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--time_up_to', type=int, default=16384,
                      help='largest global batch that is also timed')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--per_device', type=int, default=2048,
                      help='per-device batch of the device-count sweep')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()

  names = args.losses.split(',')
  mesh = make_mesh(8)
  by_batch = [
      measure(name, batch, args.dim, mesh, args.repeats,
              timed=batch <= args.time_up_to)
      for batch in map(int, args.batches.split(','))
      for name in names]
  by_devices = [
      measure(name, args.per_device * n, args.dim, make_mesh(n), args.repeats,
              timed=False)
      for name in names for n in (1, 2, 4, 8)]

  if args.json:
    print(json.dumps({'dim': args.dim, 'platform': jax.devices()[0].platform,
                      'by_batch': by_batch, 'by_devices': by_devices},
                     indent=1))
  else:
    print_table(f'Global batch sweep, 8 devices, D={args.dim} '
                '(memory per device; step = value and grad)', by_batch)
    print_table(f'Device sweep, {args.per_device} per device, D={args.dim} '
                '(memory per device)', by_devices)


if __name__ == '__main__':
  main()
