"""The DINO / iBOT projection head of the self-distillation objectives.

features [..., D] -> MLP (Dense, GELU, Dense, GELU, Dense) to a bottleneck,
L2-normalised -> logits over `prototypes`: the cosine of the bottleneck
with each prototype vector (DINO's weight-normalised last layer with its
norm fixed at 1), so the logits lie in [-1, 1] and the temperatures alone
set their sharpness. Student and teacher run the same head, each on its own
parameters; the teacher's are an EMA copy (lit_navit/teacher.py).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lit_navit.models import partitioning
from lit_navit.models import precision


def l2_normalize(x, eps: float = 1e-12):
  """x / |x| along the last axis; zero stays zero."""
  return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps)))


class DINOHead(nn.Module):
  """[..., D] -> float32 logits [..., prototypes]."""
  hidden_dim: int
  bottleneck_dim: int
  prototypes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = partitioning.constrain_batch(x)
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.02),
        name=name, **precision.dense_options())
    y = nn.gelu(dense(self.hidden_dim, 'Dense_0')(x))
    y = nn.gelu(dense(self.hidden_dim, 'Dense_1')(y))
    y = l2_normalize(dense(self.bottleneck_dim, 'bottleneck')(y).astype(jnp.float32))
    prototypes = self.param('prototypes', nn.initializers.truncated_normal(0.02),
                            (self.bottleneck_dim, self.prototypes))
    # Normalised along the bottleneck: each prototype is a unit vector.
    prototypes = prototypes * jnp.reciprocal(jnp.sqrt(jnp.maximum(
        jnp.sum(prototypes * prototypes, 0, keepdims=True), 1e-12)))
    return partitioning.constrain_batch(y @ prototypes)
