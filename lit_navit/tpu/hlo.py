"""The optimized HLO text of a compiled program, read for what each run does.

`Module` splits the text (`compiled.as_text()`) into computations and their
instructions, resolves which computation calls which and how often (a while
loop's body once per trip, read from `known_trip_count` or from a
`i < constant` condition), and sums per-computation quantities over one run
of the program (`total`). collectives.py and roofline.py read the program
through it.
"""

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'c64': 8, 'c128': 16}

_HEADER = re.compile(r'^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> (.*)\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\](\{[^{}]*\})?')
_CALLEE = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)'
                     r'=%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r'\bcondition=%([\w.\-]+)')
_S32_CONSTANT = re.compile(r's32\[\]\S* constant\((\d+)\)')
_OPERAND = re.compile(r'%([\w.\-]+)')


def array_bytes(type_text: str, hbm_only: bool = False) -> list[int]:
  """Bytes of each array in an HLO type (a tuple's too). `hbm_only`: only
  arrays in the default memory space (no `S(n)` in their layout: on TPU,
  S(1) is the core's VMEM)."""
  sizes = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if hbm_only and re.search(r'S\(\d+\)', layout):
      continue
    width = DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else 4)
    sizes.append(width * math.prod(int(d) for d in dims.split(',') if d))
  return sizes


@dataclasses.dataclass
class Instruction:
  name: str
  type: str     # its result type, layouts included
  op: str       # 'fusion', 'all-gather-start', ...
  operands: list  # names of its operands
  line: str     # the whole line, attributes and metadata included


class Module:
  """An optimized HLO module's computations and call graph."""

  def __init__(self, text: str):
    self.computations = collections.defaultdict(list)  # name -> [Instruction]
    self.types = collections.defaultdict(dict)  # computation -> {value: type}
    self.results = {}  # computation -> its result type
    self.calls = collections.defaultdict(list)  # computation -> [(callee, times)]
    self.fused = set()  # computations a fusion calls (their values stay on chip)
    self.unknown_trip_counts = 0
    self.entry = None
    self._contains = {}
    bounds = collections.defaultdict(list)  # computation -> its s32 constants
    less_than = set()  # computations computing `x < constant`
    loops = []  # (computation, condition, body, known trip count or None)
    current = None
    for line in text.splitlines():
      header = _HEADER.match(line)
      if header:
        current = header.group(1)
        self.results[current] = header.group(3)
        if line.startswith('ENTRY'):
          self.entry = current
        for param, type_text in re.findall(r'([\w.\-]+): ([^,()]*(?:\([^()]*\))?[^,()]*)',
                                           header.group(2)):
          self.types[current][param] = type_text
        continue
      if current is None:
        continue
      bounds[current] += [int(n) for n in _S32_CONSTANT.findall(line)]
      if 'ROOT' in line and 'direction=LT' in line:
        less_than.add(current)
      match = _INSTRUCTION.match(line)
      if match:
        name, type_text, op, rest = match.groups()
        self.types[current][name] = type_text
        self.computations[current].append(Instruction(
            name, type_text, op, _OPERAND.findall(rest.split(')', 1)[0]), line))
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
      if match and match.group(3) == 'fusion':
        self.fused.update(re.findall(r'\bcalls=%([\w.\-]+)', line))
      self.calls[current] += [(callee, 1) for callee in callees]
    if self.entry is None:
      raise ValueError('no ENTRY computation in the HLO text')
    for caller, condition, body, trips in loops:
      if trips is None and condition in less_than and len(bounds[condition]) == 1:
        trips = bounds[condition][0]
      if trips is None:
        self.unknown_trip_counts, trips = self.unknown_trip_counts + 1, 1
      self.calls[caller].append((body, trips))
    # What a fused computation calls (a nested fusion, a reducer) is fused too.
    stack = list(self.fused)
    while stack:
      for callee, _ in self.calls[stack.pop()]:
        if callee not in self.fused:
          self.fused.add(callee)
          stack.append(callee)

  def total(self, own: dict) -> collections.Counter:
    """own: computation -> Counter of what one run of its own instructions
    does -> the Counter of one run of the program, every callee included as
    often as it runs."""
    memo = {}

    def totals_of(name, depth=0):
      if name not in memo:
        if depth > 256:  # HLO calls form a DAG; this bounds a malformed text
          raise ValueError('HLO call graph nests deeper than 256')
        total = collections.Counter(own.get(name, {}))
        for callee, times in self.calls[name]:
          for key, value in totals_of(callee, depth + 1).items():
            total[key] += value * times
        memo[name] = total
      return memo[name]

    return totals_of(self.entry)

  def contains(self, computation: str, ops) -> bool:
    """Whether `computation` or anything it calls has an instruction whose op
    starts with one of `ops` (a tuple of op names)."""
    key = (computation, ops)
    if key not in self._contains:
      self._contains[key] = (
          any(i.op.startswith(ops) for i in self.computations[computation])
          or any(self.contains(callee, ops) for callee, _ in self.calls[computation]))
    return self._contains[key]
