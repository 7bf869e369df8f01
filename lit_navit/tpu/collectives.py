"""Bytes each chip moves through collectives in one run of a compiled program.

Read from the optimized HLO text of a compiled executable. A collective
inside a while loop (a scanned layer stack, the ring loss) counts once per
trip: loop bodies are multiplied by their `known_trip_count`, through any
nesting of loops, calls and fusions. Per chip, with n devices in a replica
group and the usual ring algorithms:

  all-gather          result bytes x (n-1)/n
  reduce-scatter      result bytes x (n-1)       (its input is n x the result)
  all-reduce          bytes x 2(n-1)/n
  all-to-all          bytes x (n-1)/n
  collective-permute  bytes

TPU spells a reduce-scatter as a fusion whose all-reduce it slices to the
chip's shard (`%all-reduce-scatter`, its output 1/n of the all-reduce); it
is counted as the reduce-scatter it is. TPU runs a collective asynchronously
as fusions that start, continue and finish it, each holding a copy of the op:
it is counted once, where it starts. Replica groups are read in each of their spellings, the mesh one with
`device_ids=` included; a group that cannot be read would count as one
device, moving nothing.
"""

import collections
import dataclasses
import math
import re

from lit_navit.tpu import hlo

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
         'collective-permute')

_OP = re.compile(r'%([\w.\-]+) = (.*?) (all-gather-start|all-gather|reduce-scatter|'
                 r'all-reduce-start|all-reduce|all-to-all|'
                 r'collective-permute-start|collective-permute)\(')
_CHANNEL = re.compile(r'\bchannel_id=(\d+)')
_TYPE_LAYOUT = re.compile(r'\{[^{}]*\}')


@dataclasses.dataclass
class Collectives:
  """Per-chip bytes by kind, and loops whose trip count XLA did not know."""
  bytes_by_kind: dict
  unknown_trip_counts: int = 0

  @property
  def total(self) -> int:
    return sum(self.bytes_by_kind.values())


def _group_size(line: str) -> int:
  """Devices in each replica group, in any of the HLO spellings."""
  # mesh['a'=4,'b'=4] {'a'}, or with the devices' order between:
  # mesh['a'=4,'b'=4], device_ids=([4,4]T(1,0)) {'a'} (TPU's usual spelling).
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{}]*\{([^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    axes = re.findall(r"'(\w+)'", mesh.group(2))
    return math.prod(int(sizes[a]) for a in axes)
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]', line)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if explicit:
    return len(explicit.group(1).split(','))
  return 1


def _bytes_per_chip(kind: str, type_text: str, line: str) -> float:
  sizes = hlo.array_bytes(type_text)
  if kind == 'all-gather-start':
    sizes = sizes[len(sizes) // 2:]  # (operands..., results...)
  elif kind == 'collective-permute-start':
    sizes = sizes[:1]  # (operand, result, u32 contexts)
  n = _group_size(line)
  size = sum(sizes)
  base = kind.removesuffix('-start')
  if base == 'collective-permute':
    return size
  if n <= 1:
    return 0.0
  factor = {'all-gather': (n - 1) / n, 'reduce-scatter': n - 1,
            'all-reduce': 2 * (n - 1) / n, 'all-to-all': (n - 1) / n}[base]
  return size * factor


def from_hlo_text(text: str) -> Collectives:
  """The collectives of an optimized HLO module (`compiled.as_text()`)."""
  module = hlo.Module(text)
  # computation -> {op name: [kind, bytes, key]}; key: (kind, channel, type)
  ops = collections.defaultdict(dict)
  async_starts = set()  # computations that start a TPU async collective
  for current, instructions in module.computations.items():
    out_bytes = sum(hlo.array_bytes(module.results[current]))
    for instruction in instructions:
      line = instruction.line
      if 'custom_call_target="AsyncCollectiveStart"' in line:
        async_starts.add(current)
      op = _OP.search(line)
      if not op:
        continue
      kind = op.group(3).removesuffix('-start')
      channel = _CHANNEL.search(line)
      key = (kind, channel and channel.group(1), _TYPE_LAYOUT.sub('', op.group(2)))
      ops[current][op.group(1)] = [
          kind, _bytes_per_chip(op.group(3), op.group(2), line), key]
      if (kind == 'all-reduce' and _group_size(line) > 1
          and sum(hlo.array_bytes(op.group(2))) == _group_size(line) * out_bytes):
        # TPU's reduce-scatter: a fusion whose all-reduce it slices to this
        # chip's 1/n shard (`%all-reduce-scatter`); half an all-reduce's bytes.
        ops[current][op.group(1)][:2] = 'reduce-scatter', ops[current][op.group(1)][1] / 2

  # TPU runs a collective asynchronously as a fusion that starts it, fusions
  # that continue it beside other work and one that finishes it, each
  # holding a copy of the op under the same channel: count it where it starts.
  started = {key for c in async_starts for _, _, key in ops[c].values()}
  own = collections.defaultdict(collections.Counter)
  for computation, its_ops in ops.items():
    for kind, moved, key in its_ops.values():
      if computation in async_starts or key not in started:
        own[computation][kind] += moved
  totals = module.total(own)
  return Collectives({k: int(totals[k]) for k in KINDS}, module.unknown_trip_counts)
