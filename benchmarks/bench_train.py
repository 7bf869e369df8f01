"""Training throughput on this machine: the peers' workloads, NaViT packing, the demo.

Times the trainer's own compiled train step (`Trainer.compiled_step`: both
towers, the sigmoid loss, the Adam chain, donated state) in one process,
warm-up steps excluded, medians over the timed steps:

  ceiling  a 2048^3 float32 matmul under jax.jit, GFLOP/s, median of 10 before
           the first run and after each: a run's MFU is against the mean of
           the two around it (steps run back to back, as in training: a
           matmul right after a big step runs slow while the step's freed
           temporaries go back to the OS);
  w1, w2   PEER_BASELINES' workloads: B/16 + text B at batch 8, S/16 + text S
           at batch 32 (MAP head, 64 caption tokens, vocab 32000, embed 768),
           each 224x224 image alone in a row of L=196 tokens, random pixels
           and tokens; step time against big_vision's and open_clip's;
  navit    packing against padding at equal tokens per step: pipeline batches
           of synthetic JPEGs (side ~ U(64, 256), p=16, L=256), E=16 images a
           row against one image a row, the same rows, and packed with the
           captions packed too (input.text_packing); the batches are made
           before timing and the pipeline's own rate is reported apart;
  demo     configs/demo.py's model on its own pipeline's batches.

Each workload runs with both towers' encoders scanned and unrolled (`--scan`).
The machine is shared: 'CPU share' is this process's CPU time over the timed
steps' wall time times the cores, so a run that got less than ~0.9 of the
machine was slowed by other jobs.
FLOPs are flops.training_flops (remat recompute not counted); 'XLA GFLOP' is
the compiled step's cost_analysis(), which counts a scanned layer once and
so only cross-checks the unrolled (scan off) step. Page faults and system
time show what re-faulting each step's temporaries costs; the header
records GLIBC_TUNABLES, since glibc.malloc.hugetlb=1 (transparent huge
pages for malloc) changes that cost.

  python benchmarks/bench_train.py --workloads w1 --steps 5 --warmup 2
  python benchmarks/bench_train.py --workloads navit,demo --json
  python benchmarks/bench_train.py --workloads navit --navit-model demo   # quick

--peers times W1 and W2 against open_clip's own step (benchmarks/
open_clip_peer.py; needs the `bench` extra) and a jax matmul ceiling,
interleaved round by round in persistent worker processes
(benchmarks/interleave.py), and reports each ratio's median and spread over
rounds. Each --our-env adds one of our arms run under those environment
variables (e.g. GLIBC_TUNABLES or XLA_FLAGS), to compare settings the same way:

  python benchmarks/bench_train.py --peers --workloads w1,w2 --scan off --rounds 4 --steps 2
  python benchmarks/bench_train.py --peers --workloads w1 --scan off \
      --our-env '' --our-env GLIBC_TUNABLES=glibc.malloc.hugetlb=1
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lit_navit import config as config_lib
from lit_navit import sharding
from lit_navit import trainer as trainer_lib
from lit_navit.data import batch as batch_lib
from lit_navit.data import sources
from lit_navit.models import flops as flops_lib
from lit_navit.models import two_towers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # pylint: disable=wrong-import-position

WORKLOADS = ('w1', 'w2', 'navit', 'demo')
# PEER_BASELINES' workloads: image and text tower, batch.
PEER_WORKLOADS = {'w1': ('B/16', 'B', 8), 'w2': ('S/16', 'S', 32)}
# --peers: timed steps per arm and round (B/16-sized steps take seconds), and
# 2048^3 matmuls per round for the ceiling.
PEERS_STEPS = 2
CEILING_MATMULS = 10
# Issue 10's target: our W1 and W2 steps at most this multiple of open_clip's.
PEERS_TARGET_OVER_OPEN_CLIP = 0.8
# Warm-up and timed steps when --warmup / --steps are not given: B/16-sized
# steps take seconds, the demo model's milliseconds.
DEFAULT_STEPS = {'w1': (2, 5), 'w2': (2, 5), 'navit': (1, 4), 'demo': (5, 30)}
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                           'configs', 'demo.py')

# /work/shared/PEER_BASELINES.md (2026-11-21, this kind of 2-core CPU): step
# seconds (median) and images/s, from other runs under other loads: --peers
# measures open_clip in the same run instead.
PEER_STEP_SECONDS = {'w1': {'big_vision': 10.18, 'open_clip': 9.19},
                     'w2': {'big_vision': 14.66, 'open_clip': 10.24}}
PEER_W1_IMAGES_PER_S = {'big_vision': 0.79, 'open_clip': 0.87}
# lit_navit's targets: step time at most these multiples of the peers'; NaViT
# images/s at least this multiple of W1's at the same model size.
TARGET_STEP_RATIO = {'big_vision': 0.9, 'open_clip': 1.0}
TARGET_NAVIT_OVER_W1 = 3.0
# Pipeline batches drawn per workload: the first BURN_IN are dropped (best-fit
# packing takes small images first while the pack buffer settles, so early
# rows hold more images than later ones); the next PIPELINE_BATCHES give the
# pipeline's rate and the images and tokens a step (step time does not depend
# on a batch's contents: shapes are static); the train steps take their last.
BURN_IN = 16
PIPELINE_BATCHES = 64


@dataclasses.dataclass
class Workload:
  """One train step to time.

  Its config, the host batches fed to it in turn, and the mean images and
  real image tokens in one of its batches.
  """
  name: str
  config: object
  batches: list
  images_per_step: float
  tokens_per_step: float
  notes: dict = dataclasses.field(default_factory=dict)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workloads', default='w1,w2,navit,demo',
                      help=f'comma-separated, of {",".join(WORKLOADS)}')
  parser.add_argument('--scan', default='on,off',
                      help="encoders scanned ('on') and/or unrolled ('off')")
  parser.add_argument('--warmup', type=int, help='untimed steps per run '
                      f'(default per workload: {DEFAULT_STEPS})')
  parser.add_argument('--steps', type=int, help='timed steps per run')
  parser.add_argument('--navit-model', choices=('b16', 'demo'), default='b16',
                      help="navit: W1's towers (B/16, text B) or the demo's")
  parser.add_argument('--navit-rows', type=int, default=8,
                      help="navit: rows per step (default W1's batch)")
  parser.add_argument('--navit-text-len', type=int,
                      help="navit: caption tokens T (default W1's 64; demo 16)")
  parser.add_argument('--navit-captions-per-row', type=float, default=4.3,
                      help='navit packed: caption rows per row (rows hold ~4.2 '
                      'images here; bench_pipeline.py --captions-per-row)')
  parser.add_argument('--navit-text-rows-per-caption', type=float, default=0.22,
                      help='navit packed text: text rows per caption row '
                      '(captions here: 14.3 of 64 tokens on average)')
  parser.add_argument('--records', type=int, default=1024,
                      help='synthetic JPEGs encoded up front for the pipelines')
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of tables')
  parser.add_argument('--peers', action='store_true',
                      help='w1/w2 against open_clip and a matmul ceiling, interleaved')
  parser.add_argument('--rounds', type=int, default=4, help='--peers: rounds')
  parser.add_argument('--our-env', action='append',
                      help="--peers: one of our arms per use, under these "
                      "'VAR=value ...' environment variables ('' = as is); "
                      "'config.KEY=value' items override our config instead")
  parser.add_argument('--no-open-clip', action='store_true',
                      help='--peers: only our arms (and the ceiling), to compare settings')
  parser.add_argument('--worker', choices=('lit_navit', 'ceiling'),
                      help=argparse.SUPPRESS)  # --peers starts its arms so.
  parser.add_argument('--override', action='append', default=[],
                      help=argparse.SUPPRESS)  # An arm's 'KEY=value' for its config.
  args = parser.parse_args()
  args.workloads = args.workloads.split(',')
  unknown = set(args.workloads) - set(WORKLOADS)
  if unknown:
    parser.error(f'unknown workloads {sorted(unknown)}; expected {WORKLOADS}')
  scans = args.scan.split(',')
  if not set(scans) <= {'on', 'off'}:
    parser.error(f"--scan takes 'on' and/or 'off', got {args.scan!r}")
  args.scan = [s == 'on' for s in scans]
  if args.peers and not set(args.workloads) & set(PEER_WORKLOADS):
    parser.error(f'--peers times {sorted(PEER_WORKLOADS)}, got --workloads {args.workloads}')
  args.our_env = [parse_env(e, parser) for e in args.our_env or ['']]
  return args


def parse_env(assignments: str, parser) -> dict:
  """{'VAR': 'value'} from "VAR=value VAR2=value2"."""
  env = {}
  for item in shlex.split(assignments):
    name, sep, value = item.partition('=')
    if not sep or not name:
      parser.error(f'--our-env takes VAR=value assignments, got {item!r}')
    env[name] = value
  return env


# --- configs ---------------------------------------------------------------

def with_input(config, *, rows, tokens_per_row, slots, text_len, patch_size):
  """`config` with the batch shapes set: B rows of L tokens, E slots, T, p."""
  config.batch_size = rows
  config.input.update(tokens_per_row=tokens_per_row, images_per_row=slots,
                      text_len=text_len, patch_sizes=(patch_size,))
  return config


def peer_config(image_variant: str, text_variant: str):
  """PEER_BASELINES' two towers: MAP head, learned posemb, vocab 32000, 64 tokens."""
  config = config_lib.default_config()
  config.model.image.update(variant=image_variant, pool='map')
  config.model.text.update(variant=text_variant, vocab_size=32_000, max_len=64,
                           pool='last')
  config.model.embed_dim = 768
  config.model.loss = 'sigmoid'
  return config


def navit_input(config, slots: int, captions_per_row: float | None,
                text_rows_per_caption: float | None = None):
  """NaViT's setting: side ~ U(64, 256) (longer side), no token dropping;
  captions packed at `text_rows_per_caption` if given."""
  config.input.images_per_row = slots
  config.input.captions_per_row = captions_per_row
  if text_rows_per_caption:
    config.input.text_packing = True
    config.input.text_rows_per_caption = text_rows_per_caption
  config.input.resolution.update(mode='side', dist='uniform', min=64, max=256)
  config.input.token_drop.kind = 'none'
  return config


def demo_config():
  """configs/demo.py's config, as the demo trains it."""
  return config_lib.load_config_file(DEMO_CONFIG)


def navit_model_config(model: str, text_len: int | None):
  """W1's towers or the demo's (at p=16), with text length T; returns (config, T)."""
  if model == 'b16':
    config, default_len = peer_config('B/16', 'B'), 64
  else:
    config, default_len = demo_config(), 16
    config.model.image.variant = 'mu/16'
  text_len = text_len or default_len
  config.model.text.max_len = max(config.model.text.max_len, text_len)
  return config, text_len


# --- batches ---------------------------------------------------------------

def full_rows_batch(spec: batch_lib.BatchSpec, vocab_size: int, seed: int = 0):
  """One square image filling each row (L = side^2) and one random caption a row."""
  side = int(round(spec.tokens_per_row ** 0.5))
  if side * side != spec.tokens_per_row or spec.slots != 1:
    raise ValueError(f'full rows need a square L and E=1, got {spec}')
  rng = np.random.default_rng(seed)
  batch = spec.empty()
  batch['image/patches'][:] = rng.uniform(-1, 1, batch['image/patches'].shape)
  batch['image/yx'][:] = np.stack(np.divmod(np.arange(side * side), side), -1)
  batch['image/segment'][:] = 1
  batch['image/grid'][:] = side
  batch['text/tokens'][:] = rng.integers(1, vocab_size, batch['text/tokens'].shape)
  batch['text/slot'][:] = np.arange(spec.rows_per_group)  # Row r's one image.
  batch['text/valid'][:] = True
  batch['valid'][:] = True
  batch['index'][:] = np.arange(spec.rows)[:, None]
  batch_lib.validate_batch(batch, spec)
  return batch


class InMemorySource:
  """Records held as bytes, so reading them costs nothing."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


def encoded_records(source_config, count: int) -> InMemorySource:
  """The first `count` records of a source, drawn and encoded now (untimed)."""
  source_config = source_config.copy_and_resolve_references()
  source_config.size = max(source_config.size, count)
  source = sources.make_source(source_config)
  return InMemorySource([source[i] for i in range(count)])


def batch_counts(batches) -> tuple[float, float]:
  """Mean images and real (non-padding) image tokens per batch."""
  return (float(np.mean([b['valid'].sum() for b in batches])),
          float(np.mean([np.count_nonzero(b['image/segment']) for b in batches])))


def pipeline_workload(name: str, config, source, count: int, **notes) -> Workload:
  """A workload fed `count` batches of `config`'s pipeline (see BURN_IN)."""
  # One caption group per device, as the trainer's mesh over all devices has.
  with trainer_lib.make_pipeline(config, source, rows=config.batch_size,
                                 groups=jax.device_count()) as pipe:
    for _ in range(BURN_IN):
      next(pipe)
    start = time.perf_counter()
    batches = [next(pipe) for _ in range(max(count, PIPELINE_BATCHES))]
    seconds = time.perf_counter() - start
    text_padding = pipe.stats['text_padding_fraction']
  images, tokens = batch_counts(batches)
  notes['pipeline'] = {'images_per_s': images * len(batches) / seconds,
                       'tokens_per_s': tokens * len(batches) / seconds,
                       'workers': config.input.workers}
  notes['text_padding_fraction'] = text_padding
  return Workload(name, config, batches[-count:], images, tokens, notes)


# --- workloads -------------------------------------------------------------

def peer_workload(name: str) -> Workload:
  """W1 (B/16, batch 8) or W2 (S/16, batch 32): 196-patch images, one a row."""
  image, text, rows = PEER_WORKLOADS[name]
  config = with_input(peer_config(image, text), rows=rows, tokens_per_row=196,
                      slots=1, text_len=64, patch_size=16)
  spec = batch_lib.BatchSpec(rows=rows, tokens_per_row=196, slots=1, text_len=64,
                             patch_size=16)
  batch = full_rows_batch(spec, config.model.text.vocab_size)
  return Workload(name, config, [batch], *batch_counts([batch]))


def navit_workloads(args, count: int) -> list:
  """Packed (E=16, captions only for filled slots) and padded (E=1) runs over
  the same synthetic JPEGs."""
  base, text_len = navit_model_config(args.navit_model, args.navit_text_len)
  base = with_input(base, rows=args.navit_rows, tokens_per_row=256, slots=16,
                    text_len=text_len, patch_size=16)
  base.input.source = sources.default_source_config()
  records = encoded_records(base.input.source, args.records)
  packed_text = args.navit_text_rows_per_caption
  arms = (('navit packed', 16, args.navit_captions_per_row, None),
          ('navit packed text', 16, args.navit_captions_per_row, packed_text),
          ('navit padded', 1, None, None))
  return [pipeline_workload(
      name, navit_input(base.copy_and_resolve_references(), slots, captions,
                        text_rows),
      records, count, model=args.navit_model)
          for name, slots, captions, text_rows in arms]


def demo_workload(args, count: int) -> Workload:
  """The demo config's model on batches of its own pipeline and source."""
  config = demo_config()
  records = encoded_records(config.input.source, args.records)
  return pipeline_workload('demo', config, records, count)


# --- timing ----------------------------------------------------------------

def make_trainer(config, workdir: str):
  """A Trainer for `config` whose own input pipeline stays idle.

  The Trainer starts prefetching from config.input.source when built; this
  benchmark feeds its own batches, so that source shrinks to a few tiny
  images read inline and its prefetch thread is stopped at once.
  """
  idle = config.copy_and_resolve_references()
  idle.input.source.update(kind='synthetic', size=8, min_side=16, max_side=16)
  idle.input.update(pack_buffer=1, workers=0)
  config_lib.check_config(idle)
  trainer = trainer_lib.Trainer(idle, workdir)
  trainer.pipeline.close()
  return trainer


def device_batches(trainer, batches):
  """Host batches as the trainer's global arrays (model keys only)."""
  return [sharding.make_global_batch(trainer_lib.model_inputs(b),
                                     trainer.mesh) for b in batches]


def usage() -> np.ndarray:
  """[wall, user CPU, system CPU seconds, minor page faults] of this process so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return np.array([time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt])


def matmul_ceiling(size: int = 2048, repeats: int = 10) -> dict:
  """A jitted float32 size^3 matmul: median GFLOP/s (min, max), GFLOP per CPU-second."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  samples = []
  for _ in range(repeats):
    before = usage()
    matmul(x).block_until_ready()
    samples.append(usage() - before)
  samples = np.array(samples)
  gflop = 2 * size ** 3 / 1e9
  rates = gflop / samples[:, 0]
  return {'gflops': float(np.median(rates)), 'gflops_min': float(rates.min()),
          'gflops_max': float(rates.max()),
          'gflops_per_cpu_s': gflop * repeats / samples[:, 1:3].sum()}


def run_steps(compiled, state, batches, warmup: int, steps: int):
  """Runs warmup + steps train steps back to back, as the training loop does.

  Returns (usage() of each timed step, the last loss).
  """
  timed, loss = [], None
  for i in range(warmup + steps):
    before = usage()
    state, step_metrics = compiled(state, batches[i % len(batches)])
    loss = float(jax.block_until_ready(step_metrics)['loss'])
    if i >= warmup:
      timed.append(usage() - before)
  return np.array(timed), loss


def time_steps(workload: Workload, scan: bool, warmup: int, steps: int) -> dict:
  """Builds, compiles and times the train step of `workload`; returns its figures."""
  config = workload.config.copy_and_resolve_references()
  config.model.image.scan = config.model.text.scan = scan
  with tempfile.TemporaryDirectory() as workdir:
    trainer = make_trainer(config, workdir)
    try:
      batches = device_batches(trainer, workload.batches)
      start = time.perf_counter()
      state = jax.block_until_ready(trainer.restore_or_init())
      init_seconds = time.perf_counter() - start
      start = time.perf_counter()
      compiled, flops = trainer.compiled_step(state, batches[0])
      compile_seconds = time.perf_counter() - start
      samples, loss = run_steps(compiled, state, batches, warmup, steps)
    finally:
      trainer.checkpointer.close()
  if not np.isfinite(loss):
    raise FloatingPointError(f'{workload.name}: loss {loss} after {warmup + steps} steps')
  spec = batch_lib.spec_of(workload.batches[0])
  image_flops = 3 * flops_lib.image_forward_flops(config.model, spec)
  seconds, user, system, faults = np.median(samples, axis=0)
  images, tokens = workload.images_per_step, workload.tokens_per_step
  return {
      'workload': workload.name, 'scan': scan, 'rows': spec.rows,
      'tokens_per_row': spec.tokens_per_row, 'slots': spec.slots,
      'text_len': spec.text_len, 'patch_size': spec.patch_size,
      'params': two_towers.param_count(trainer.abstract_state['params']),
      'warmup': warmup, 'steps': steps, 'step_seconds': seconds,
      'step_seconds_min': samples[:, 0].min(), 'step_seconds_max': samples[:, 0].max(),
      'images_per_step': images, 'image_tokens_per_step': tokens,
      'images_per_s': images / seconds, 'tokens_per_s': tokens / seconds,
      'flops': flops, 'text_flops_fraction': 1 - image_flops / flops,
      'xla_flops': float(compiled.cost_analysis()['flops']),
      'gflops_per_s': flops / seconds / 1e9,
      'cpu_seconds': user + system, 'system_seconds': system,
      'page_faults': faults, 'temp_bytes': compiled.memory_analysis().temp_size_in_bytes,
      'cpu_share': (user + system) / seconds / len(os.sched_getaffinity(0)),
      'init_seconds': init_seconds, 'compile_seconds': compile_seconds,
      'final_loss': loss, **workload.notes,
  }


# --- summary ---------------------------------------------------------------

def add_ratios(run: dict, ceiling: dict) -> None:
  """MFU (wall and CPU time) and step time against the peers' recorded steps."""
  run['ceiling'] = ceiling
  run['mfu'] = run['gflops_per_s'] / ceiling['gflops']
  run['mfu_cpu_time'] = (run['flops'] / run['cpu_seconds'] / 1e9
                         / ceiling['gflops_per_cpu_s'])
  peers = PEER_STEP_SECONDS.get(run['workload'])
  if peers:
    run['vs_peers'] = {
        peer: {'step_ratio': run['step_seconds'] / seconds,
               'target': TARGET_STEP_RATIO[peer]}
        for peer, seconds in peers.items()}


def navit_summary(runs: list) -> dict:
  """Packed (captions one a row, and packed too) over padded images/s per
  scan setting, and over W1's (the best W1 run, when it ran twice)."""
  by = {(r['workload'], r['scan']): r for r in runs}
  summary = {}
  for scan in (True, False):
    padded = by.get(('navit padded', scan))
    for arm in ('navit packed', 'navit packed text'):
      packed = by.get((arm, scan))
      if not (packed and padded):
        continue
      entry = {'packed_over_padded': packed['images_per_s'] / padded['images_per_s'],
               'target_over_w1': TARGET_NAVIT_OVER_W1}
      if packed['model'] == 'b16':
        entry['packed_over_peer_w1'] = {
            peer: packed['images_per_s'] / rate
            for peer, rate in PEER_W1_IMAGES_PER_S.items()}
        w1 = [r['images_per_s'] for r in runs if r['workload'] == 'w1']
        if w1:
          entry['packed_over_w1'] = packed['images_per_s'] / max(w1)
      summary[f"{arm}, scan {'on' if scan else 'off'}"] = entry
  return summary


def machine() -> dict:
  """What ran the benchmark, with the environment that changes its figures."""
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cores': len(os.sched_getaffinity(0)), 'device': str(jax.devices()[0]),
          'jax': jax.__version__,
          'GLIBC_TUNABLES': os.environ.get('GLIBC_TUNABLES', ''),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def _scan(run: dict) -> str:
  return 'on' if run['scan'] else 'off'


def print_runs(runs: list) -> None:
  """The main table: step time, throughput, FLOPs and MFU of each run."""
  print('| workload | scan | B×L (E), T | params | step s, median (min–max) | '
        'images/s | tokens/s | GFLOP/step | GFLOP/pair | XLA GFLOP/step | '
        'text FLOPs | GFLOP/s | ceiling GFLOP/s | % of ceiling |')
  print('|' + ' --- |' * 14)
  for r in runs:
    print(f"| {r['workload']} | {_scan(r)} | "
          f"{r['rows']}×{r['tokens_per_row']} ({r['slots']}), {r['text_len']} | "
          f"{r['params'] / 1e6:.1f}M | {r['step_seconds']:.3f} "
          f"({r['step_seconds_min']:.3f}–{r['step_seconds_max']:.3f}) | "
          f"{r['images_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['flops'] / 1e9:.4g} | "
          f"{r['flops'] / r['images_per_step'] / 1e9:.1f} | "
          f"{r['xla_flops'] / 1e9:.4g} | {r['text_flops_fraction']:.0%} | "
          f"{r['gflops_per_s']:.0f} | {r['ceiling']['gflops']:.0f} | {r['mfu']:.0%} |")


def print_diagnostics(runs: list) -> None:
  """Where the time went: CPU and system time, page faults, memory, load."""
  print('\n| workload | scan | CPU s/step | of which system | page faults/step | '
        'temp GiB | CPU share | % of ceiling per CPU-second | load | init s | compile s |')
  print('|' + ' --- |' * 11)
  for r in runs:
    print(f"| {r['workload']} | {_scan(r)} | {r['cpu_seconds']:.3f} | "
          f"{r['system_seconds']:.3f} | {r['page_faults']:.0f} | "
          f"{r['temp_bytes'] / 2 ** 30:.2f} | {r['cpu_share']:.2f} | "
          f"{r['mfu_cpu_time']:.0%} | {r['load_average']:.1f} | "
          f"{r['init_seconds']:.1f} | {r['compile_seconds']:.1f} |")


def print_peers(runs: list) -> None:
  """Step time over big_vision's and open_clip's recorded steps (PEER_BASELINES.md).

  Those steps ran in other runs under other loads: --peers measures side by side.
  """
  rows = [r for r in runs if 'vs_peers' in r]
  if not rows:
    return
  print('\n| workload | scan | × big_vision (recorded; target ≤ 0.9) | '
        '× open_clip (recorded; target ≤ 1.0) |')
  print('| --- | --- | --- | --- |')
  for r in rows:
    bv, oc = r['vs_peers']['big_vision'], r['vs_peers']['open_clip']
    print(f"| {r['workload']} | {_scan(r)} | {bv['step_ratio']:.2f} | "
          f"{oc['step_ratio']:.2f} |")


def print_navit(result: dict) -> None:
  """Pipeline rates, images a step, and packed over padded (and W1) images/s."""
  pipelines = {r['workload']: r for r in result['runs'] if 'pipeline' in r}
  for name, r in pipelines.items():
    p = r['pipeline']
    print(f"{name}: pipeline {p['images_per_s']:.0f} images/s, "
          f"{p['tokens_per_s']:.0f} tokens/s ({p['workers']} workers, alone); "
          f"{r['images_per_step']:.1f} images and "
          f"{r['image_tokens_per_step']:.0f} real tokens a step; "
          f"{r['text_padding_fraction']:.1%} of caption tokens padding")
  for scan, s in result['navit'].items():
    versus = [f'{v:.2f}× {k} W1' for k, v in s.get('packed_over_peer_w1', {}).items()]
    if 'packed_over_w1' in s:
      versus.append(f"{s['packed_over_w1']:.2f}× this run's W1")
    versus = (f"; packed = {', '.join(versus)} (target ≥ {s['target_over_w1']:.0f}×)"
              if versus else '')
    print(f"{scan}: packed / padded images/s = "
          f"{s['packed_over_padded']:.2f}{versus}")


def print_tables(result: dict) -> None:
  m, load = result['machine'], result['load_average']
  print(f"{m['device']}, {m['cores']} cores, jax {m['jax']}, "
        f"GLIBC_TUNABLES={m['GLIBC_TUNABLES']!r}; load average {load['start']:.1f} "
        f"-> {load['end']:.1f}")
  print('2048^3 f32 matmul (jax jit), median of 10 (min–max) before the first run '
        'and after each, GFLOP/s [GFLOP per CPU-second]: ' + ', '.join(
            f"{c['gflops']:.0f} ({c['gflops_min']:.0f}–{c['gflops_max']:.0f}) "
            f"[{c['gflops_per_cpu_s']:.0f}]" for c in result['ceilings'])
        + "; a run's ceiling is the mean of the two around it\n")
  print_runs(result['runs'])
  print_diagnostics(result['runs'])
  print_peers(result['runs'])
  print()
  print_navit(result)


def planned_runs(args):
  """(workload, warmup, steps) for each workload asked for, batches made now."""
  for name in args.workloads:
    small = name == 'navit' and args.navit_model == 'demo'
    default_warmup, default_steps = DEFAULT_STEPS['demo' if small else name]
    warmup = default_warmup if args.warmup is None else args.warmup
    steps = default_steps if args.steps is None else args.steps
    if name in ('w1', 'w2'):
      workloads = [peer_workload(name)]
    elif name == 'navit':
      workloads = navit_workloads(args, warmup + steps)
    else:
      workloads = [demo_workload(args, warmup + steps)]
    for workload in workloads:
      yield workload, warmup, steps


# --- side by side with open_clip (--peers) ---------------------------------

def lit_navit_setup(name: str, scan: bool, warmup: int, workdir: str,
                    trainers: list, overrides=()):
  """(step, info) for interleave.serve: our compiled train step of W1 or W2,
  with `overrides` ('KEY=value') applied to its config."""
  workload = peer_workload(name)
  config = workload.config.copy_and_resolve_references()
  config.model.image.scan = config.model.text.scan = scan
  config_lib.apply_overrides(config, [o.split('=', 1) for o in overrides])
  trainer = make_trainer(config, workdir)
  trainers.append(trainer)
  batch, = device_batches(trainer, workload.batches)
  state = {'now': jax.block_until_ready(trainer.restore_or_init())}
  start = time.perf_counter()
  compiled, flops = trainer.compiled_step(state['now'], batch)
  compile_seconds = time.perf_counter() - start
  losses = []

  def step():
    state['now'], step_metrics = compiled(state['now'], batch)
    losses.append(float(jax.block_until_ready(step_metrics)['loss']))

  for _ in range(warmup):
    step()
  info = {'framework': 'lit_navit', 'jax': jax.__version__, 'flops': flops,
          'params': two_towers.param_count(trainer.abstract_state['params']),
          'compile_seconds': compile_seconds, 'warmup_losses': losses[:],
          'temp_bytes': compiled.memory_analysis().temp_size_in_bytes}
  return step, info


def ceiling_setup(size: int = 2048):
  """(step, info) for interleave.serve: one jitted float32 size^3 matmul."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  return (lambda: matmul(x).block_until_ready(),
          {'framework': 'jax matmul', 'flops': 2 * size ** 3, 'jax': jax.__version__})


def serve_worker(args) -> None:
  """This process is one --peers arm: set up, then time steps on request."""
  if args.worker == 'ceiling':
    interleave.serve(ceiling_setup)
    return
  name, = args.workloads
  warmup = DEFAULT_STEPS[name][0] if args.warmup is None else args.warmup
  trainers = []
  with tempfile.TemporaryDirectory() as workdir:
    try:
      interleave.serve(lambda: lit_navit_setup(name, args.scan[0], warmup, workdir,
                                               trainers, args.override))
    finally:
      for trainer in trainers:
        trainer.checkpointer.close()


def our_arm_name(scan: bool, env: dict) -> str:
  return ' '.join([f"lit_navit scan {'on' if scan else 'off'}",
                   *(f'{k}={v}' for k, v in env.items())])


def our_arms(scans, our_env, name: str) -> list:
  """(arm name, worker argv, environment) of each of our arms: one per scan
  setting and --our-env, whose 'config.KEY' items become config overrides."""
  arms = []
  for scan in scans:
    for assignments in our_env:
      env = {k: v for k, v in assignments.items() if not k.startswith('config.')}
      overrides = [f'--override={k[len("config."):]}={v}'
                   for k, v in assignments.items() if k.startswith('config.')]
      arms.append((our_arm_name(scan, assignments),
                   ['--worker', 'lit_navit', '--workloads', name,
                    '--scan', 'on' if scan else 'off'] + overrides, env))
  return arms


def start_peer_workers(args, name: str) -> list:
  """The arms of workload `name`, each set up and warm, one after another.

  Ours (one per --scan and --our-env), open_clip's, and the matmul ceiling.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  script = [sys.executable, os.path.abspath(__file__)]
  warmup = ['--warmup', str(DEFAULT_STEPS[name][0] if args.warmup is None else args.warmup)]
  arms = [(arm, script + argv + warmup, env)
          for arm, argv, env in our_arms(args.scan, args.our_env, name)]
  if not args.no_open_clip:
    arms.append(('open_clip', [sys.executable, os.path.join(here, 'open_clip_peer.py'),
                               name] + warmup, {}))
  arms.append(('ceiling', script + ['--worker', 'ceiling'], {}))
  workers = []
  try:
    for arm, argv, env in arms:
      print(f'{name}: starting {arm}', file=sys.stderr, flush=True)
      workers.append(interleave.Worker(arm, argv, env))
  except BaseException:
    for worker in workers:
      worker.close()
    raise
  return workers


def peers_summary(name: str, workers: list, rounds: list, steps: int) -> dict:
  """Each arm's step time, GFLOP/s and share of the same round's ceiling, and
  the within-round ratios: each of our arms over open_clip and over our first."""
  ceiling = next(w for w in workers if w.name == 'ceiling')
  ceiling_gflops = ceiling.info['flops'] / interleave.round_seconds(rounds, 'ceiling') / 1e9
  ours = [w for w in workers if w.info['framework'] == 'lit_navit']
  flops = ours[0].info['flops']  # open_clip runs the same shapes.
  cores = len(os.sched_getaffinity(0))
  arms = {}
  for worker in workers:
    if worker is ceiling:
      continue
    seconds = interleave.round_seconds(rounds, worker.name)
    samples = np.concatenate([r[worker.name] for r in rounds])
    gflops = flops / seconds / 1e9
    arms[worker.name] = {
        'info': worker.info, 'step_seconds': interleave.spread(seconds),
        'gflops_per_s': interleave.spread(gflops),
        'of_ceiling': interleave.spread(gflops / ceiling_gflops),
        'cpu_share': interleave.spread(samples[:, 1] / samples[:, 0] / cores),
        'page_faults': float(np.median(samples[:, 2])),
        'images_per_s': interleave.spread(PEER_WORKLOADS[name][2] / seconds)}
  ratios = {f'{w.name} / open_clip': interleave.ratio_spread(rounds, w.name, 'open_clip')
            for w in ours if 'open_clip' in arms}
  ratios.update({f'{w.name} / {ours[0].name}': interleave.ratio_spread(
      rounds, w.name, ours[0].name) for w in ours[1:]})
  return {'workload': name, 'rounds': len(rounds), 'steps_per_round': steps,
          'orders': [r['order'] for r in rounds],
          'ceiling_gflops': interleave.spread(ceiling_gflops), 'arms': arms,
          'ratios': ratios, 'target_over_open_clip': PEERS_TARGET_OVER_OPEN_CLIP,
          'load_average': os.getloadavg()[0],
          'samples': {w.name: [r[w.name].tolist() for r in rounds] for w in workers}}


def run_peers(args) -> dict:
  """W1 and/or W2, each in its own phase of interleaved rounds."""
  steps = PEERS_STEPS if args.steps is None else args.steps
  phases = []
  for name in [w for w in args.workloads if w in PEER_WORKLOADS]:
    workers = start_peer_workers(args, name)
    try:
      counts = {w.name: CEILING_MATMULS if w.name == 'ceiling' else steps for w in workers}
      rounds = interleave.run_rounds(workers, args.rounds, counts)
    finally:
      for worker in workers:
        worker.close()
    phases.append(peers_summary(name, workers, rounds, steps))
    print(json.dumps({k: v for k, v in phases[-1].items() if k != 'samples'},
                     default=float), file=sys.stderr, flush=True)  # Kept if a later phase fails.
  return {'machine': machine(), 'phases': phases}


def _spread_text(s: dict, fmt: str = '.2f') -> str:
  return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def print_peers_tables(result: dict) -> None:
  m = result['machine']
  print(f"{m['device']}, {m['cores']} cores, jax {m['jax']}, "
        f"GLIBC_TUNABLES={m['GLIBC_TUNABLES']!r}, XLA_FLAGS={m['XLA_FLAGS']!r}")
  for phase in result['phases']:
    print(f"\n{phase['workload'].upper()}: {phase['rounds']} interleaved rounds × "
          f"{phase['steps_per_round']} steps; load average {phase['load_average']:.1f} "
          f"at the end; matmul ceiling {_spread_text(phase['ceiling_gflops'], '.0f')} "
          'GFLOP/s over rounds. Median over rounds (min–max):\n')
    print('| arm | params | step s | images/s | GFLOP/s | of same-round ceiling | '
          'CPU share | page faults/step |')
    print('|' + ' --- |' * 8)
    for arm, a in phase['arms'].items():
      print(f"| {arm} | {a['info']['params'] / 1e6:.1f}M | {_spread_text(a['step_seconds'])} | "
            f"{_spread_text(a['images_per_s'])} | {_spread_text(a['gflops_per_s'], '.0f')} | "
            f"{_spread_text(a['of_ceiling'])} | {_spread_text(a['cpu_share'])} | "
            f"{a['page_faults']:.0f} |")
    print('\n| within-round ratio of step times | median | IQR | min–max | target |')
    print('| --- | --- | --- | --- | --- |')
    for ratio, r in phase['ratios'].items():
      target = (f"≤ {phase['target_over_open_clip']}" if ratio.endswith('open_clip')
                else '')
      print(f"| {ratio} | {r['median']:.2f} | {r['q1']:.2f}–{r['q3']:.2f} | "
            f"{r['min']:.2f}–{r['max']:.2f} | {target} |")


def main():
  args = parse_args()
  jax.config.update('jax_threefry_partitionable', True)
  if args.worker:
    serve_worker(args)
    return
  if args.peers:
    result = run_peers(args)
    if args.json:
      print(json.dumps(result, indent=2, default=float))
    else:
      print_peers_tables(result)
    return
  load_start = os.getloadavg()[0]
  ceilings, runs = [matmul_ceiling()], []
  for workload, warmup, steps in planned_runs(args):
    for scan in args.scan:
      run = time_steps(workload, scan, warmup, steps)
      run['load_average'] = os.getloadavg()[0]
      time.sleep(1)  # Lets the run's freed memory go back to the OS.
      ceilings.append(matmul_ceiling())
      add_ratios(run, {k: (ceilings[-2][k] + ceilings[-1][k]) / 2
                       for k in ('gflops', 'gflops_per_cpu_s')})
      runs.append(run)
  result = {
      'machine': machine(),
      'load_average': {'start': load_start, 'end': os.getloadavg()[0]},
      'ceilings': ceilings, 'runs': runs, 'navit': navit_summary(runs),
  }
  if args.json:
    print(json.dumps(result, indent=2, default=float))
  else:
    print_tables(result)


if __name__ == '__main__':
  main()
