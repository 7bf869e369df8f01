"""Named transformer sizes, big_vision style: 'B/16' = ViT-Base, patch size 16.

'mu' (micro) is a tiny size for tests and CPU demos.
"""

import re

# name: (width, depth, mlp_dim, num_heads)
SIZES = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'So400m': (1152, 27, 4304, 16),
}


def decode(variant: str) -> dict:
  """'B/16' -> {width, depth, mlp_dim, num_heads, patch_size: 16}; 'B' -> no patch_size."""
  match = re.fullmatch(r'([A-Za-z0-9]+?)(?:/(\d+))?', variant)
  if not match or match.group(1) not in SIZES:
    raise ValueError(f'unknown variant {variant!r}; expected one of '
                     f'{sorted(SIZES)}, optionally with /patch_size')
  width, depth, mlp_dim, num_heads = SIZES[match.group(1)]
  decoded = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if match.group(2):
    decoded['patch_size'] = int(match.group(2))
  return decoded
