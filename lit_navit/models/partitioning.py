"""Activation sharding: pin activations' batch axis to the mesh's batch axes.

Parameters are fsdp-sharded on their width (sharding.py). Left alone, XLA's
propagation carries that width sharding into the activations, and a
data x fsdp step then all-gathers activations instead of weights (55 GiB
per chip per step at So400m on v5e-256). Each encoder block's input and
output and each pooled output are therefore pinned to
[batch over BATCH_AXES, rest replicated], so fsdp gathers the (much smaller)
weights. The mesh comes from the caller's `jax.sharding.use_abstract_mesh`;
without one (evaluation, tests on one device) this does nothing.

fsdp gathers each layer's weights in the forward pass, and remat's
recompute gathers them again for the backward pass (3.1 of So400m's
6.2 GiB of collectives per chip per step on v5e-256). Under the remat
policy 'weights_saveable' the encoder blocks' dense layers pass their
kernels through `gathered_weights`: replicated and named, so the gathered
(compute-dtype) kernels are saved from the forward pass instead, one full
copy of the encoders' weights per chip.
"""

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

# The name the remat policy 'weights_saveable' saves.
GATHERED_WEIGHTS = 'gathered_weights'

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


@jax.custom_vjp
def _replicated(kernel):
  return jax.lax.with_sharding_constraint(kernel, P())


def _replicated_fwd(kernel):
  return _replicated(kernel), None


def _replicated_bwd(_, grad):
  # Left unconstrained, the gradient takes the parameter's fsdp sharding
  # and XLA reduce-scatters it; constrained replicated (the transpose of
  # the forward constraint) it would be all-reduced whole.
  return (grad,)


_replicated.defvjp(_replicated_fwd, _replicated_bwd)


def gathered_weights(kernel):
  """kernel replicated over the ambient mesh (fsdp gathers it here), named
  GATHERED_WEIGHTS for the remat policy to save."""
  if not jax.sharding.get_abstract_mesh().empty:
    kernel = _replicated(kernel)
  return checkpoint_name(kernel, GATHERED_WEIGHTS)


def saving_gathered_weights(dot_general=lax.dot_general):
  """A dense layer's dot_general whose kernel goes through gathered_weights."""
  def dot(x, kernel, *args, **kwargs):
    return dot_general(x, gathered_weights(kernel), *args, **kwargs)
  return dot
