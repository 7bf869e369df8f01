"""Where a train step's time goes on the XLA CPU backend, by model part.

Runs the trainer's compiled step for a workload of bench_train.py (default
W1) under jax.profiler, reads the per-thunk events of XLA's CPU runtime
from the Perfetto trace (one event per executed HLO instruction: a fusion,
a dot, a copy), and attributes each to a part of the model by the
op_name metadata of the instructions in the optimized HLO (the flax module
path; a fusion by the majority of the ops fused into it):

  attention core   q·k, softmax, weights·v (masking included)
  attention proj   the query/key/value/out projections
  MLP              MlpBlock (both dense layers and the GELU)
  layer norm       LayerNorm_*, encoder_norm
  optimizer        everything outside value_and_grad: the optax update (Adam
                   moments, weight decay, apply) and the step's metrics
  embed / heads    patch and token embeddings, position embeddings, MAP and
                   projection heads
  loss             the sigmoid loss
  other            copies, transposes and anything unattributed

Thunks of one step may run concurrently on the CPU threads, so shares are of
summed thunk time (busy time), and the wall time of the step is given apart.

  python benchmarks/profile_step.py --workload w1 --scan off
  python benchmarks/profile_step.py --workload w1 --scan off --top 20 --json
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=wrong-import-position

# Parts in the order a name is tested against them: the first match wins, so
# projections (inside attention's module path) come before the core.
PARTS = (
    ('attention proj', re.compile(r'MultiHeadDotProductAttention_0/(query|key|value|out)/')),
    ('attention core', re.compile(r'MultiHeadDotProductAttention_0/')),
    ('MLP', re.compile(r'MlpBlock_0/')),
    ('layer norm', re.compile(r'LayerNorm|encoder_norm')),
    ('embed / heads', re.compile(r'embedding|posemb|pos_embedding|MAPHead|head/|'
                                 r'PatchEmbedding|Embed_0|/head')),
    ('loss', re.compile(r'shard_map|sigmoid|ppermute|log_sigmoid|logsumexp')),
)
# The model and the loss run under value_and_grad, so their ops' names hold
# 'jvp(' (forward) or 'transpose(jvp(' (backward); the update does not.
DIFFERENTIATED = re.compile(r'jvp\(')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workload', choices=('w1', 'w2'), default='w1')
  parser.add_argument('--scan', choices=('on', 'off'), default='off')
  parser.add_argument('--remat', default='none',
                      help='remat_policy of both towers (encoder.REMAT_POLICIES)')
  parser.add_argument('--steps', type=int, default=1, help='profiled steps')
  parser.add_argument('--top', type=int, default=12,
                      help='also list the N instructions that took longest')
  parser.add_argument('--json', action='store_true')
  return parser.parse_args()


def _op_name(line: str) -> str | None:
  match = re.search(r'metadata=\{[^}]*op_name="([^"]*)"', line)
  return match.group(1) if match else None


def instruction_metadata(hlo_text: str) -> dict:
  """{instruction name: op_name} from optimized HLO text."""
  found = {}
  for line in hlo_text.splitlines():
    match = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=', line)
    op_name = _op_name(line)
    if match and op_name is not None:
      found[match.group(1)] = op_name
  return found


def fusion_members(hlo_text: str) -> dict:
  """{fusion instruction: op_names of the ops inside its fused computation}.

  A fusion's own metadata names only its root, often a reshape or an add;
  the dots and reductions inside tell better what it computes.
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*[({]', line)
    if header and not line.startswith(' '):
      current = computations.setdefault(header.group(1), [])
      continue
    op_name = _op_name(line)
    if current is not None and op_name is not None:
      current.append(op_name)
  members = {}
  for line in hlo_text.splitlines():
    match = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bcalls=%?([\w.\-]+)', line)
    if match:
      members[match.group(1)] = computations.get(match.group(2), [])
  return members


def part_of(op_names: list) -> str:
  """The model part a list of op_names belongs to, by majority."""
  votes = collections.Counter()
  for op_name in filter(None, op_names):
    if not DIFFERENTIATED.search(op_name):
      votes['optimizer'] += 1
      continue
    votes[next((part for part, pattern in PARTS if pattern.search(op_name)), 'other')] += 1
  return votes.most_common(1)[0][0] if votes else 'other'


def thunk_events(trace_dir: str, module_name: str) -> list:
  """(name, microseconds) of each XLA CPU thunk of `module_name` in the trace."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [(e['name'], e['dur']) for e in events
          if e.get('ph') == 'X' and 'thunk_executor' in e.get('args', {}).get('_src', '')
          and module_name in e['args'].get('hlo_module', module_name)]


def breakdown(compiled, run_step, steps: int, workdir: str) -> dict:
  """Profiles `steps` calls of run_step() (which runs `compiled` and blocks).

  Returns the mean wall seconds of a step, and the thunk seconds per step by
  model part and by HLO instruction (with its part).
  """
  trace_dir = os.path.join(workdir, 'trace')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      run_step()
    wall = (time.perf_counter() - start) / steps
  hlo = compiled.as_text()
  module = re.search(r'HloModule\s+([\w.\-]+)', hlo).group(1)
  metadata, members = instruction_metadata(hlo), fusion_members(hlo)
  by_part, by_instruction = collections.Counter(), collections.Counter()
  part = lambda name: part_of(members.get(name) or [metadata.get(name, '')])
  for name, micros in thunk_events(trace_dir, module):
    by_instruction[name] += micros / 1e6 / steps
    by_part[part(name)] += micros / 1e6 / steps
  return {'step_seconds': wall, 'busy_seconds': sum(by_part.values()),
          'parts': dict(by_part.most_common()),
          'top': [(name, s, part(name)) for name, s in by_instruction.most_common()]}


def profile(workload_name: str, scan: bool, remat: str, steps: int) -> dict:
  """Compiles `workload_name`'s train step, profiles `steps` steps after one."""
  workload = bench_train.peer_workload(workload_name)
  config = workload.config.copy_and_resolve_references()
  config.model.image.update(scan=scan, remat_policy=remat)
  config.model.text.update(scan=scan, remat_policy=remat)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = bench_train.make_trainer(config, workdir)
    try:
      batch, = bench_train.device_batches(trainer, workload.batches)
      state = {'now': trainer.restore_or_init()}
      compiled, flops = trainer.compiled_step(state['now'], batch)

      def run_step():
        state['now'], metrics = compiled(state['now'], batch)
        jax.block_until_ready(metrics)

      run_step()  # Warm-up: first touch of the step's buffers.
      result = breakdown(compiled, run_step, steps, workdir)
    finally:
      trainer.checkpointer.close()
  busy = result['busy_seconds']
  return {
      'workload': workload_name, 'scan': scan, 'remat': remat, 'steps': steps,
      'step_seconds': result['step_seconds'],
      'gflops_per_s': flops / result['step_seconds'] / 1e9, 'busy_seconds': busy,
      'parts': {part: {'seconds': s, 'share': s / busy}
                for part, s in result['parts'].items()},
      'top': [{'instruction': name, 'seconds': s, 'part': part}
              for name, s, part in result['top']],
      'machine': bench_train.machine(), 'load_average': os.getloadavg()[0],
  }


def main():
  args = parse_args()
  jax.config.update('jax_threefry_partitionable', True)
  result = profile(args.workload, args.scan == 'on', args.remat, args.steps)
  result['top'] = result['top'][:args.top]
  if args.json:
    print(json.dumps(result, indent=2))
    return
  m = result['machine']
  print(f"{result['workload']}, scan {args.scan}, remat {args.remat}: step "
        f"{result['step_seconds']:.2f} s ({result['gflops_per_s']:.0f} GFLOP/s), "
        f"thunk busy time {result['busy_seconds']:.2f} s; {m['cores']} cores, "
        f"load {result['load_average']:.1f}, XLA_FLAGS={m['XLA_FLAGS']!r}\n")
  print('| part | s/step (busy) | share |\n| --- | --- | --- |')
  for part, p in result['parts'].items():
    print(f"| {part} | {p['seconds']:.3f} | {p['share']:.0%} |")
  print('\n| instruction | s/step | part |\n| --- | --- | --- |')
  for t in result['top']:
    print(f"| {t['instruction']} | {t['seconds']:.3f} | {t['part']} |")


if __name__ == '__main__':
  main()
