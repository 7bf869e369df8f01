"""Activation sharding: pin activations' batch axis to the mesh's batch axes.

Parameters are fsdp-sharded on their width (sharding.py). Left alone, XLA's
propagation carries that width sharding into the activations, and a
data x fsdp step then all-gathers activations instead of weights (55 GiB
per chip per step at So400m on v5e-256). Each encoder block's input and
output and each pooled output are therefore pinned to
[batch over BATCH_AXES, rest replicated], so fsdp gathers the (much smaller)
weights. The mesh comes from the caller's `jax.sharding.use_abstract_mesh`;
without one (evaluation, tests on one device) this does nothing.
"""

import jax
from jax.sharding import PartitionSpec as P

# The mesh axes the batch (rows, caption rows) is split over, together.
BATCH_AXES = ('data', 'fsdp')


def constrain_batch(x):
  """x with its leading axis sharded over the ambient mesh's batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))
