"""A projected TPU step time from compiled programs, and the method behind it.

XLA's TPU cost analysis (`compiled.cost_analysis()`) estimates each op's
time from its FLOPs and bytes on the target chip ('optimal_seconds'), but on
the real step it cannot be used as is: it counts a while loop's body once
(a scanned layer stack counts as one layer), it charges each `ConcatBitcast`
custom call -1 s, and it sees no work inside Pallas kernels. So:

0. `cost_of` adds 1 s back per `ConcatBitcast` in the program's HLO. libtpu
   emits one wherever it assembles an array from async slices (parameters
   and optimizer state above a few MB, scan backward passes), so every
   realistic step has dozens: B/16 unrolled to depth 1 has 93 and reads
   -92.985 s, i.e. 0.0145 s once corrected (benchmarks/results/plan_tpu/
   before_concat_fix/b16_concat_bitcast_probe.json; tests/test_plan.py
   checks the correction on a program that is all such arrays). Without it the
   extrapolated time was negative and the projection fell back to the
   aggregate roofline, as every figure planned before this correction did.

1. Compile unrolled copies of the step (no scan) at tower depths (1, 1),
   (2, 1) and (1, 2): no layer loop is left, and the per-layer cost of each
   tower is a difference of two compiles. The step's cost is then
   base + depth_img * image_layer + depth_txt * text_layer, for FLOPs, HBM
   bytes and optimal seconds alike. Towers of equal depth D need only
   (1, 1) and (2, 2): cost(1, 1) + (D - 1) * (cost(2, 2) - cost(1, 1)).
   Checked against a full unrolled compile in tests/test_plan.py. Remat's recompute is in these programs,
   so hardware FLOPs exceed the analytic model FLOPs by about its share.
2. Pallas attention kernels (splash) are charged analytically: the q.k and
   weights.v matmuls of every layer, forward, backward (2x) and remat's
   recomputed forward, at the chip's peak: an optimistic figure for them.
3. Collectives: the real (scanned) step's bytes per chip (collectives.py),
   at the chip's ring-collective bandwidth (chips.py), added to compute
   with no overlap: a conservative figure. `overlapped_s` assumes XLA's
   async collectives hide them entirely behind compute.
4. A second compute estimate, the fusion roofline (roofline.py): all FLOPs
   at the chip's peak plus the memory-bound ops' HBM bytes at its
   bandwidth, fusion operands and results only. XLA's estimate charges a
   fusion's on-chip intermediates as HBM traffic, and so runs high for
   elementwise-heavy steps (B/16 at 32k pairs on v5e-256: 107.9 ms by XLA,
   64.2 ms by this; BENCHMARKS.md); the fusion roofline assumes every
   matmul at peak, and so runs low. A real step should land between the
   two.
"""

import dataclasses

from lit_navit.tpu import roofline


def depths_to_compile(depth_img: int, depth_txt: int) -> tuple:
  return ((1, 1), (2, 2)) if depth_img == depth_txt else ((1, 1), (2, 1), (1, 2))


KEYS = ('flops', 'bytes accessed', 'optimal_seconds', 'memory_bound_bytes')
# The custom call libtpu's cost analysis charges -1 s (step 0 above).
_CONCAT_BITCAST = 'custom_call_target="ConcatBitcast"'


@dataclasses.dataclass
class Projection:
  compute_s: float
  collectives_s: float
  hardware_flops: float  # per chip, remat recompute included
  # 'xla': XLA's per-op estimate; 'roofline': max(FLOPs / peak, bytes / HBM
  # bandwidth) of the whole program, where that estimate is unusable.
  compute_method: str = 'xla'
  # Step 4's estimate: every FLOP at peak, plus memory-bound HBM bytes.
  fusion_roofline_s: float = 0.0

  @property
  def step_s(self) -> float:
    return self.compute_s + self.collectives_s

  @property
  def overlapped_s(self) -> float:
    return max(self.compute_s, self.collectives_s)


def cost_of(compiled) -> dict:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  text = compiled.as_text()
  cost = {k: float(analysis.get(k, 0.0)) for k in KEYS}
  cost['optimal_seconds'] += text.count(_CONCAT_BITCAST)
  cost['memory_bound_bytes'] = float(roofline.memory_bound_bytes(text))
  return cost


def extrapolate(costs: dict, depth_img: int, depth_txt: int) -> dict:
  """costs: {(d_img, d_txt): cost} at `depths_to_compile` -> the cost at
  the real depths."""
  out = {}
  for key in KEYS:
    base = costs[(1, 1)][key]
    if (2, 2) in costs:
      out[key] = base + (depth_img - 1) * (costs[(2, 2)][key] - base)
      continue
    img = costs[(2, 1)][key] - base
    txt = costs[(1, 2)][key] - base
    out[key] = base + (depth_img - 1) * img + (depth_txt - 1) * txt
  return out


def pallas_attention_flops(tokens: int, rows: int, width: int, depth: int,
                           remat: bool) -> float:
  """FLOPs of one tower's attention cores in one training step (per program)."""
  forward = depth * rows * 2 * 2 * tokens * tokens * width
  return forward * (3 + (1 if remat else 0))


def project(cost: dict, chip, devices_per_chip: int, collective_bytes: float,
            extra_flops: float = 0.0) -> Projection:
  peak = chip.peak_bf16_flops / devices_per_chip
  compute_s, method = cost['optimal_seconds'], 'xla'
  if compute_s <= 0:  # a cost analysis this method cannot read: roofline instead
    compute_s, method = max(
        cost['flops'] / peak,
        cost['bytes accessed'] / (chip.hbm_bytes_per_s / devices_per_chip)), 'roofline'
  compute_s += extra_flops / peak
  collectives_s = collective_bytes / (chip.ici_bytes_per_s / devices_per_chip)
  fusion_roofline_s = ((cost['flops'] + extra_flops) / peak + cost['memory_bound_bytes']
                       / (chip.hbm_bytes_per_s / devices_per_chip))
  return Projection(compute_s, collectives_s, cost['flops'] + extra_flops, method,
                    fusion_roofline_s)
