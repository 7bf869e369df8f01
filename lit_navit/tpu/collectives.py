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

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'c64': 8, 'c128': 16}
KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
         'collective-permute')

_HEADER = re.compile(r'^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$')
_OP = re.compile(r'%([\w.\-]+) = (.*?) (all-gather-start|all-gather|reduce-scatter|'
                 r'all-reduce-start|all-reduce|all-to-all|'
                 r'collective-permute-start|collective-permute)\(')
_CHANNEL = re.compile(r'\bchannel_id=(\d+)')
_TYPE_LAYOUT = re.compile(r'\{[^{}]*\}')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]')
_CALLEE = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)'
                     r'=%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r'\bcondition=%([\w.\-]+)')
_S32_CONSTANT = re.compile(r's32\[\]\S* constant\((\d+)\)')


@dataclasses.dataclass
class Collectives:
  """Per-chip bytes by kind, and loops whose trip count XLA did not know."""
  bytes_by_kind: dict
  unknown_trip_counts: int = 0

  @property
  def total(self) -> int:
    return sum(self.bytes_by_kind.values())


def _array_bytes(type_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    width = DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else 4)
    sizes.append(width * math.prod(int(d) for d in dims.split(',') if d))
  return sizes


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
  sizes = _array_bytes(type_text)
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
  # computation -> {op name: [kind, bytes, key]}; key: (kind, channel, type)
  ops = collections.defaultdict(dict)
  async_starts = set()  # computations that start a TPU async collective
  calls = collections.defaultdict(list)  # computation -> [(callee, times)]
  bounds = collections.defaultdict(list)  # computation -> its s32 constants
  less_than = set()  # computations computing `x < constant`
  loops = []  # (computation, condition, body, known trip count or None)
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      out_bytes = sum(_array_bytes(line.rsplit(' -> ', 1)[-1]))
      if line.startswith('ENTRY'):
        entry = current
      continue
    if current is None:
      continue
    bounds[current] += [int(n) for n in _S32_CONSTANT.findall(line)]
    if 'ROOT' in line and 'direction=LT' in line:
      less_than.add(current)
    if 'custom_call_target="AsyncCollectiveStart"' in line:
      async_starts.add(current)
    op = _OP.search(line)
    if op:
      kind = op.group(3).removesuffix('-start')
      channel = _CHANNEL.search(line)
      key = (kind, channel and channel.group(1), _TYPE_LAYOUT.sub('', op.group(2)))
      ops[current][op.group(1)] = [
          kind, _bytes_per_chip(op.group(3), op.group(2), line), key]
      if (kind == 'all-reduce' and _group_size(line) > 1
          and sum(_array_bytes(op.group(2))) == _group_size(line) * out_bytes):
        # TPU's reduce-scatter: a fusion whose all-reduce it slices to this
        # chip's 1/n shard (`%all-reduce-scatter`); half an all-reduce's bytes.
        ops[current][op.group(1)][:2] = 'reduce-scatter', ops[current][op.group(1)][1] / 2
    callees = _CALLEE.findall(line)
    for branches in _BRANCHES.findall(line):
      callees += re.findall(r'%([\w.\-]+)', branches)
    if not callees:
      continue
    if ' while(' in line:
      trips = _TRIPS.search(line)
      condition = _CONDITION.search(line)
      loops.append((current, condition.group(1) if condition else None,
                    re.search(r'\bbody=%([\w.\-]+)', line).group(1),
                    int(trips.group(1)) if trips else None))
      continue
    calls[current] += [(callee, 1) for callee in callees]

  # TPU runs a collective asynchronously as a fusion that starts it, fusions
  # that continue it beside other work and one that finishes it, each
  # holding a copy of the op under the same channel: count it where it starts.
  started = {key for c in async_starts for _, _, key in ops[c].values()}
  own = collections.defaultdict(collections.Counter)
  for computation, its_ops in ops.items():
    for kind, moved, key in its_ops.values():
      if computation in async_starts or key not in started:
        own[computation][kind] += moved

  unknown = 0
  for caller, condition, body, trips in loops:
    if trips is None and condition in less_than and len(bounds[condition]) == 1:
      trips = bounds[condition][0]
    if trips is None:
      unknown, trips = unknown + 1, 1
    calls[caller].append((body, trips))

  memo = {}

  def totals_of(name, depth=0):
    """Bytes of one run of computation `name`, its callees included."""
    if name not in memo:
      if depth > 256:  # HLO calls form a DAG; this bounds a malformed text
        raise ValueError('HLO call graph nests deeper than 256')
      total = collections.Counter(own[name])
      for callee, times in calls[name]:
        for kind, size in totals_of(callee, depth + 1).items():
          total[kind] += size * times
      memo[name] = total
    return memo[name]

  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  totals = totals_of(entry)
  return Collectives({k: int(totals[k]) for k in KINDS}, unknown)
