"""HBM bytes of a compiled TPU program's memory-bound work, at fusion grain.

XLA's TPU cost analysis charges each op inside a fusion for its operands and
result as if they went through HBM ('bytes accessed'); a layer norm over a
bf16 [11520, 768] tensor, 35 MB in and out, is charged 142 MB. On a TPU a
fusion's intermediates stay on chip: HBM sees its operands and results only.
This reads the optimized HLO and sums, for one run of the program (loop
bodies times their trips), the HBM bytes of every op that is not a matrix
multiply: each fusion's operands and results outside on-chip memory (layouts
without `S(n)`), each copy or other op the same way, and the piece each
async copy or slice moves between HBM and on-chip memory. Matmul fusions (a
convolution or dot inside), collectives and Pallas kernels are left out:
cost_model.py charges matmuls at the chip's peak FLOP/s, collectives at the
interconnect's bandwidth and Pallas kernels by their FLOPs.
"""

import re

from lit_navit.tpu import hlo

# Ops that move no HBM bytes of their own, or are charged elsewhere
# (collectives, by collectives.py, are told by their name's start).
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
         'call', 'conditional', 'after-all', 'partition-id', 'replica-id',
         'custom-call', 'convolution', 'dot'}
_COLLECTIVES = ('all-', 'collective-', 'reduce-scatter')
_FUSED = re.compile(r'\bcalls=%([\w.\-]+)')
# A fusion holding one of these is a matmul, a collective or a kernel.
_NOT_MEMORY_BOUND = ('convolution', 'dot', 'custom-call') + _COLLECTIVES


def memory_bound_bytes(text: str) -> int:
  """HBM bytes one run of the program moves outside matmuls (see above)."""
  module = hlo.Module(text)
  own = {}
  for computation, instructions in module.computations.items():
    if computation in module.fused:
      continue
    types = module.types[computation]
    moved = 0
    for instruction in instructions:
      op = instruction.op
      if (op in _FREE or op.endswith(('-done', '-update'))
          or op.startswith(_COLLECTIVES)):
        continue
      callee = _FUSED.search(instruction.line)
      if op == 'fusion' and callee and module.contains(callee.group(1), _NOT_MEMORY_BOUND):
        continue
      if op.endswith('-start'):  # (operand, result, context): the result's bytes
        moved += hlo.array_bytes(instruction.type)[-2]  # cross HBM once
        continue
      moved += sum(hlo.array_bytes(instruction.type, hbm_only=True))
      moved += sum(sum(hlo.array_bytes(types.get(operand, ''), hbm_only=True))
                   for operand in instruction.operands)
    own[computation] = {'bytes': moved}
  return int(module.total(own)['bytes'])
