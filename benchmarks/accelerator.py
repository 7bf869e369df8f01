"""One accelerator check: what lit_navit does on a GPU, in under 5 minutes.

Run by benchmarks/accelerator.sh, which sets up the Python it needs. On one
device it reports:

  device     its kind, the datasheet dense bfloat16 peak, and a bf16 matmul
             rate measured beside it;
  train      the trainer's compiled B/16 NaViT train step in bfloat16 (rows
             of L=256 tokens packed from images of side ~ U(64, 256), p=16,
             E=16, text B at T=64) with the dense attention and with
             cuDNN's: compile seconds, step seconds (median), images/s, MFU
             from analytic FLOPs (models/flops.py) against the datasheet
             peak (times the devices the trainer's mesh spans), the compiled
             step's memory and the first device's peak memory;
  attention  segment-masked attention on that batch's segments through
             jax.nn.dot_product_attention(implementation='cudnn') against
             the dense einsum path, both in bf16 against a float32
             reference (outputs and gradients), and forward+backward ms;
  loss       the ring sigmoid loss on 1 device against the dense reference,
             loss and gradients, and ms per value+grad.

Every section runs even if one before it failed; the exit status is 1 if a
section failed or a comparison was outside its tolerance. --cpu-smoke runs
the same code at tiny shapes on the CPU, with XLA's fused attention standing
in for cuDNN, so the script is exercised without a GPU.

  bash benchmarks/accelerator.sh [--json FILE]   # on the GPU machine
  bash benchmarks/accelerator.sh --cpu-smoke     # anywhere
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=wrong-import-position

from lit_navit import losses  # pylint: disable=wrong-import-position
from lit_navit import sharding  # pylint: disable=wrong-import-position
from lit_navit import trainer as trainer_lib  # pylint: disable=wrong-import-position
from lit_navit.data import sources  # pylint: disable=wrong-import-position
from lit_navit.models import attention as attention_lib  # pylint: disable=wrong-import-position
from lit_navit.models import variants  # pylint: disable=wrong-import-position

# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's datasheets,
# TFLOP/s, by a substring of jax's device_kind; the first match wins.
BF16_PEAK_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H200 NVL', 835.0),
    ('H100', 989.4), ('H200', 989.4), ('A100', 312.0),
)
# bf16 attention against the float32 reference: the fused kernel passes if
# its error is at most this multiple of the dense bf16 path's error, or
# below the floor (both errors relative to the reference's largest value).
ATTENTION_ERROR_FACTOR = 2.0
ATTENTION_ERROR_FLOOR = 1e-2
# Ring vs dense sigmoid loss in float32, relative to the largest value.
LOSS_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What one run measures at: the model, the packed batch, the loss batch."""
  model: str          # bench_train.navit_model_config's 'b16' or 'demo'
  rows: int
  tokens_per_row: int
  slots: int
  captions_per_row: float | None  # None: one caption row per slot
  text_len: int
  side: tuple         # image side ~ U(min, max), pixels
  records: int        # synthetic JPEGs encoded for the pipeline
  warmup: int
  steps: int
  fused: str          # the fused attention compared with the dense path
  train_attentions: tuple  # the train step is timed with each
  loss_batch: int
  loss_dim: int
  matmul: int         # side of the bf16 matmul ceiling
  repeats: int        # timed calls of the attention, loss and matmul


GPU = Shapes(model='b16', rows=64, tokens_per_row=256, slots=16,
             captions_per_row=4.3, text_len=64,
             side=(64, 256), records=768, warmup=3, steps=10, fused='cudnn',
             train_attentions=('dense', 'cudnn'),
             loss_batch=16384, loss_dim=768, matmul=8192, repeats=10)
CPU_SMOKE = Shapes(model='demo', rows=2, tokens_per_row=64, slots=4,
                   captions_per_row=None, text_len=16,
                   side=(32, 128), records=32, warmup=1, steps=2, fused='xla',
                   train_attentions=('dense',),  # The attention section covers 'xla'.
                   loss_batch=64, loss_dim=32, matmul=256, repeats=2)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cpu-smoke', action='store_true',
                      help='tiny shapes on the CPU; XLA fused attention for cuDNN')
  parser.add_argument('--rows', type=int, help='packed rows per train step')
  parser.add_argument('--steps', type=int, help='timed train steps')
  parser.add_argument('--json', help='also write the figures to this file')
  return parser.parse_args()


def timed_median(fn, repeats: int) -> float:
  """Median seconds of `fn()` (which blocks on its result) after one warm-up."""
  fn()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def peak_memory_bytes():
  """The device's peak bytes in use so far (None where it keeps no stats)."""
  stats = jax.devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


# --- device ----------------------------------------------------------------

def device_figures(shapes: Shapes) -> dict:
  device = jax.devices()[0]
  peak = next((tflops for name, tflops in BF16_PEAK_TFLOPS
               if name in device.device_kind), None)
  x = jnp.ones((shapes.matmul, shapes.matmul), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  seconds = timed_median(lambda: matmul(x).block_until_ready(), shapes.repeats)
  return {'kind': device.device_kind, 'platform': device.platform,
          'count': jax.device_count(), 'jax': jax.__version__,
          'bf16_peak_tflops': peak,
          'bf16_matmul_tflops': 2 * shapes.matmul ** 3 / seconds / 1e12,
          'matmul_side': shapes.matmul}


# --- train step ------------------------------------------------------------

def navit_config(shapes: Shapes):
  """The packed NaViT config of bench_train's navit workload, at `shapes`."""
  config, text_len = bench_train.navit_model_config(shapes.model, shapes.text_len)
  config = bench_train.with_input(config, rows=shapes.rows,
                                  tokens_per_row=shapes.tokens_per_row,
                                  slots=shapes.slots, text_len=text_len, patch_size=16)
  config = bench_train.navit_input(config, shapes.slots, shapes.captions_per_row)
  config.input.resolution.update(min=shapes.side[0], max=shapes.side[1])
  config.input.source = sources.default_source_config()
  config.model.dtype = 'bfloat16'
  return config


def navit_batches(config, shapes: Shapes, count: int = 2) -> list:
  """`count` host batches from the pipeline (after a short burn-in)."""
  records = bench_train.encoded_records(config.input.source, shapes.records)
  with trainer_lib.make_pipeline(config, records, rows=config.batch_size) as pipe:
    for _ in range(2):
      next(pipe)
    return [next(pipe) for _ in range(count)]


def train_figures(config, batches, attention: str, shapes: Shapes, peak_tflops) -> dict:
  """Compile and time the trainer's bf16 step with `attention` in both towers."""
  config = config.copy_and_resolve_references()
  config.model.image.attention = config.model.text.attention = attention
  with tempfile.TemporaryDirectory() as workdir:
    trainer = bench_train.make_trainer(config, workdir)
    try:
      placed = bench_train.device_batches(trainer, batches)
      state = jax.block_until_ready(trainer.restore_or_init())
      start = time.perf_counter()
      compiled, flops = trainer.compiled_step(state, placed[0])
      compile_seconds = time.perf_counter() - start
      samples, loss = bench_train.run_steps(compiled, state, placed, shapes.warmup,
                                            shapes.steps)
    finally:
      trainer.checkpointer.close()
  if not np.isfinite(loss):
    raise FloatingPointError(f'train step with {attention} attention: loss {loss}')
  seconds = float(np.median(samples[:, 0]))
  images = float(np.mean([b['valid'].sum() for b in batches]))
  memory = compiled.memory_analysis()
  return {
      'attention': attention, 'compile_seconds': compile_seconds,
      'step_seconds': seconds, 'step_seconds_min': float(samples[:, 0].min()),
      'step_seconds_max': float(samples[:, 0].max()), 'images_per_step': images,
      'images_per_s': images / seconds, 'flops': flops,
      'tflops_per_s': flops / seconds / 1e12,
      'mfu': (flops / seconds / 1e12 / (peak_tflops * jax.device_count())
              if peak_tflops else None),
      'compiled_bytes': (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      'temp_bytes': memory.temp_size_in_bytes,
      'device_peak_bytes_so_far': peak_memory_bytes(), 'final_loss': loss,
  }


# --- attention -------------------------------------------------------------

def attention_figures(segment, heads: int, head_dim: int, fused: str,
                      repeats: int) -> dict:
  """The fused kernel against the dense path on packed segments, in bf16."""
  rows, length = segment.shape
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cotangent = (jax.random.normal(key, (rows, length, heads, head_dim))
                        for key in keys)
  mask = attention_lib.segment_mask(segment, segment)
  fused_fn = attention_lib.get(fused)

  def value_and_grads(fn, dtype):
    def weighted(q, k, v):
      out = fn(q, k, v, mask)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    step = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True))
    args = [a.astype(dtype) for a in (q, k, v)]
    (_, out), grads = step(*args)
    run = lambda: jax.block_until_ready(step(*args))
    return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads], run

  ref_out, ref_grads, _ = value_and_grads(attention_lib.dense_attention, jnp.float32)

  def errors(out, grads):
    relative = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    return {'output': relative(out, ref_out),
            'grads': max(relative(g, r) for g, r in zip(grads, ref_grads))}

  dense_out, dense_grads, dense_run = value_and_grads(attention_lib.dense_attention,
                                                      jnp.bfloat16)
  fused_out, fused_grads, fused_run = value_and_grads(fused_fn, jnp.bfloat16)
  dense_err, fused_err = errors(dense_out, dense_grads), errors(fused_out, fused_grads)
  equal = all(fused_err[key] <= max(ATTENTION_ERROR_FACTOR * dense_err[key],
                                    ATTENTION_ERROR_FLOOR) for key in fused_err)
  dense_ms = timed_median(dense_run, repeats) * 1e3
  fused_ms = timed_median(fused_run, repeats) * 1e3
  return {'fused': fused, 'shape': [rows, length, heads, head_dim],
          'segments_per_row': float(np.mean([len(set(r) - {0}) for r in np.asarray(segment)])),
          'dense_bf16_error': dense_err, 'fused_bf16_error': fused_err,
          'equal_within_tolerance': equal,
          'tolerance': f'fused error ≤ max({ATTENTION_ERROR_FACTOR}× dense bf16 error, '
                       f'{ATTENTION_ERROR_FLOOR}), relative to the f32 reference',
          'dense_fwd_bwd_ms': dense_ms, 'fused_fwd_bwd_ms': fused_ms,
          'dense_over_fused': dense_ms / fused_ms}


# --- loss ------------------------------------------------------------------

def loss_figures(batch: int, dim: int, repeats: int) -> dict:
  """The ring sigmoid loss on a 1-device mesh against the dense reference."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'mesh': [('data', 1), ('fsdp', 1)]}), jax.devices()[:1])
  rng = np.random.default_rng(0)
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  zimg = normalise(rng.normal(size=(batch, dim))).astype(np.float32)
  ztxt = normalise(zimg + rng.normal(size=(batch, dim))).astype(np.float32)
  placed = sharding.make_global_batch(
      {'zimg': zimg, 'ztxt': ztxt, 'valid': rng.random(batch) < 0.9}, mesh)
  args = (placed['zimg'], placed['ztxt'], jnp.float32(math.log(10.0)),
          jnp.float32(-10.0))

  def value_and_grad(loss_fn):
    return jax.jit(jax.value_and_grad(
        lambda zi, zt, t, b: loss_fn(zi, zt, placed['valid'], t, b)[0],
        argnums=(0, 1, 2, 3)))

  ring = value_and_grad(losses.make_loss('sigmoid', mesh))
  dense = value_and_grad(losses.sigmoid_loss_dense)
  (ring_loss, ring_grads), (dense_loss, dense_grads) = ring(*args), dense(*args)
  loss_error = abs(float(ring_loss) - float(dense_loss)) / abs(float(dense_loss))
  grad_error = max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
                   for g, r in zip(ring_grads, dense_grads))
  return {'batch': batch, 'dim': dim, 'loss': float(dense_loss),
          'loss_relative_error': loss_error, 'grad_relative_error': grad_error,
          'equal_within_tolerance': max(loss_error, grad_error) <= LOSS_TOLERANCE,
          'tolerance': LOSS_TOLERANCE,
          'ring_ms': timed_median(lambda: jax.block_until_ready(ring(*args)), repeats) * 1e3,
          'dense_ms': timed_median(lambda: jax.block_until_ready(dense(*args)), repeats) * 1e3}


# --- the run ---------------------------------------------------------------

def section(result: dict, name: str, fn):
  """result[name] = fn(), or the error it raised; with the seconds it took."""
  start = time.perf_counter()
  try:
    result[name] = fn()
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    result[name] = {'error': f'{type(error).__name__}: {error}'}
  result.setdefault('seconds', {})[name] = time.perf_counter() - start
  print(f'[{name}: {result["seconds"][name]:.1f} s]', file=sys.stderr, flush=True)
  return result[name]


def run(shapes: Shapes) -> dict:
  result = {'shapes': dataclasses.asdict(shapes)}
  device = section(result, 'device', lambda: device_figures(shapes))
  config = navit_config(shapes)
  batches = section(result, 'batches', lambda: navit_batches(config, shapes))
  if isinstance(batches, dict):  # The pipeline failed: nothing to train on.
    return result
  result['batches'] = {'images_per_step': float(np.mean([b['valid'].sum() for b in batches])),
                       'rows': shapes.rows, 'tokens_per_row': shapes.tokens_per_row}
  peak = device.get('bf16_peak_tflops')
  for attention in shapes.train_attentions:
    section(result, f'train {attention}',
            lambda a=attention: train_figures(config, batches, a, shapes, peak))
  image = variants.decode(config.model.image.variant)
  section(result, 'attention', lambda: attention_figures(
      batches[0]['image/segment'], image['num_heads'],
      image['width'] // image['num_heads'], shapes.fused, shapes.repeats))
  section(result, 'loss', lambda: loss_figures(shapes.loss_batch, shapes.loss_dim,
                                               shapes.repeats))
  return result


def failures(result: dict) -> list:
  """Sections that raised, and comparisons outside their tolerance."""
  failed = [name for name, value in result.items()
            if isinstance(value, dict) and 'error' in value]
  failed += [name for name in ('attention', 'loss')
             if result.get(name, {}).get('equal_within_tolerance') is False]
  return failed


def _gib(value) -> str:
  return 'n/a' if value is None else f'{value / 2 ** 30:.2f} GiB'


def print_summary(result: dict) -> None:
  d = result['device']
  if 'error' not in d:
    peak = f"{d['bf16_peak_tflops']:.0f}" if d['bf16_peak_tflops'] else 'unknown'
    print(f"device: {d['kind']} ({d['platform']}, {d['count']} devices), jax {d['jax']}; "
          f"bf16 dense peak {peak} TFLOP/s (datasheet), {d['matmul_side']}^3 bf16 "
          f"matmul {d['bf16_matmul_tflops']:.1f} TFLOP/s measured")
  s = result['shapes']
  print(f"train: {s['model']} NaViT, {s['rows']} rows × {s['tokens_per_row']} tokens, "
        f"E={s['slots']}, T={s['text_len']}, bf16, {s['steps']} timed steps")
  for name in [k for k in result if k.startswith('train ')]:
    t = result[name]
    if 'error' in t:
      print(f"  {name}: FAILED {t['error']}")
      continue
    mfu = f"{t['mfu']:.1%}" if t['mfu'] is not None else 'n/a (unknown peak)'
    print(f"  {t['attention']}: compile {t['compile_seconds']:.1f} s, step "
          f"{t['step_seconds'] * 1e3:.1f} ms ({t['step_seconds_min'] * 1e3:.1f}–"
          f"{t['step_seconds_max'] * 1e3:.1f}), {t['images_per_s']:.0f} images/s, "
          f"{t['tflops_per_s']:.1f} TFLOP/s, MFU {mfu}; compiled step "
          f"{_gib(t['compiled_bytes'])} (temp {_gib(t['temp_bytes'])}), device peak "
          f"so far {_gib(t['device_peak_bytes_so_far'])}")
  a = result.get('attention', {})
  if 'error' in a:
    print(f"attention: FAILED {a['error']}")
  elif a:
    print(f"attention [{'×'.join(map(str, a['shape']))}], {a['segments_per_row']:.1f} "
          f"segments a row: {a['fused']} vs dense, errors vs f32 output "
          f"{a['fused_bf16_error']['output']:.2e} / {a['dense_bf16_error']['output']:.2e}, "
          f"grads {a['fused_bf16_error']['grads']:.2e} / {a['dense_bf16_error']['grads']:.2e}"
          f" -> {'equal' if a['equal_within_tolerance'] else 'NOT EQUAL'} within tolerance; "
          f"fwd+bwd {a['fused_fwd_bwd_ms']:.2f} ms vs {a['dense_fwd_bwd_ms']:.2f} ms "
          f"(dense / fused {a['dense_over_fused']:.2f}×)")
  l = result.get('loss', {})
  if 'error' in l:
    print(f"loss: FAILED {l['error']}")
  elif l:
    print(f"ring sigmoid loss on 1 device, N={l['batch']}, d={l['dim']}: relative "
          f"error vs dense loss {l['loss_relative_error']:.1e}, grads "
          f"{l['grad_relative_error']:.1e} -> "
          f"{'equal' if l['equal_within_tolerance'] else 'NOT EQUAL'} within "
          f"{l['tolerance']:.0e}; value+grad {l['ring_ms']:.2f} ms (dense "
          f"{l['dense_ms']:.2f} ms)")
  print('seconds per section: ' + ', '.join(
      f'{k} {v:.1f}' for k, v in result['seconds'].items()))


def main():
  args = parse_args()
  jax.config.update('jax_threefry_partitionable', True)
  shapes = CPU_SMOKE if args.cpu_smoke else GPU
  shapes = dataclasses.replace(shapes, rows=args.rows or shapes.rows,
                               steps=args.steps or shapes.steps)
  if not args.cpu_smoke and jax.default_backend() != 'gpu':
    sys.exit(f'no GPU: jax runs on {jax.default_backend()!r}; use --cpu-smoke')
  start = time.perf_counter()
  result = run(shapes)
  result['total_seconds'] = time.perf_counter() - start
  result['failures'] = failures(result)
  print_summary(result)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2, default=float)
  if result['failures']:
    sys.exit(f"failed: {', '.join(result['failures'])}")


if __name__ == '__main__':
  main()
