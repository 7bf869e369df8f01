"""Named transformer sizes, big_vision style: 'B/16' = ViT-Base, patch size 16.

'mu' (micro) is a tiny size for tests and CPU demos. A tower config may also
give its sizes explicitly (width, depth, mlp_dim, num_heads): each one set
overrides the variant's, and with all four set the variant may be empty.
"""

import re

# name: (width, depth, mlp_dim, num_heads); big_vision's table
# (arXiv 2106.04560 Table 2, plus SoViT-400m and the SigLIP 2 g-opt).
SIZES = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'So400m': (1152, 27, 4304, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'g-opt': (1536, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    'G-opt': (1536, 48, 8192, 16),
    'e': (1792, 56, 15360, 16),
}
SIZE_KEYS = ('width', 'depth', 'mlp_dim', 'num_heads')


def decode(variant: str) -> dict:
  """'B/16' -> {width, depth, mlp_dim, num_heads, patch_size: 16}; 'B' -> no
  patch_size; '' or '/16' -> only the patch size (if any)."""
  match = re.fullmatch(r'([A-Za-z0-9-]*?)(?:/(\d+))?', variant or '')
  if not match or (match.group(1) and match.group(1) not in SIZES):
    raise ValueError(f'unknown variant {variant!r}; expected one of '
                     f'{sorted(SIZES)}, optionally with /patch_size')
  decoded = {}
  if match.group(1):
    decoded = dict(zip(SIZE_KEYS, SIZES[match.group(1)]))
  if match.group(2):
    decoded['patch_size'] = int(match.group(2))
  return decoded


def tower_size(tower_config, name: str = 'tower') -> dict:
  """{width, depth, mlp_dim, num_heads} of a tower config: its variant's,
  overridden by whichever of those keys the config sets."""
  size = decode(tower_config.get('variant', ''))
  size.pop('patch_size', None)
  for key in SIZE_KEYS:
    if tower_config.get(key) is not None:
      size[key] = tower_config[key]
  missing = [k for k in SIZE_KEYS if k not in size]
  if missing:
    raise ValueError(f'{name}: variant {tower_config.get("variant")!r} gives no '
                     f'{missing}; set a named variant or {name}.{missing[0]}')
  return size
