"""Per-chip figures of the TPU generations the planner knows.

Peak bf16 matmul FLOP/s, HBM capacity and bandwidth are the published
per-chip figures of each generation. `ici_bytes_per_s` is what one chip
moves in a ring collective over one mesh axis: two ICI links (both ring
directions) at the published one-way link rate, the usual roofline for
collectives on a torus; a collective over several axes at once can use more
links, so this is the conservative figure.
"""

import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  ici_bytes_per_s: float


CHIPS = {
    'v4': Chip('v4', 275e12, 32 * GiB, 1.2e12, 2 * 4.5e10),
    'v5e': Chip('v5e', 197e12, 16 * GiB, 8.2e11, 2 * 4.5e10),
    'v5p': Chip('v5p', 459e12, 95 * 10 ** 9, 2.765e12, 2 * 9e10),
    'v6e': Chip('v6e', 918e12, 32 * GiB, 1.64e12, 2 * 9e10),
}

# jax's device_kind -> our name.
_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
          'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}


def of_device(device) -> Chip:
  """The Chip of a jax TPU device (a real one or a topology's)."""
  name = _KINDS.get(device.device_kind)
  if name is None:
    raise ValueError(f'no chip figures for device kind {device.device_kind!r}; '
                     f'known: {sorted(_KINDS)}')
  return CHIPS[name]
