"""The device mesh, parameter and batch shardings, multi-host start-up.

Config keys (`default_config` gives them):

  mesh             [(axis name, size)], -1 meaning "the remaining devices";
                   the batch is sharded over ('data', 'fsdp') together.
  sharding_rules   [(regex, 'replicate' | 'fsdp' | 'fsdp:<dim>')], first
                   match wins, every parameter must match one. 'fsdp' shards
                   a parameter's largest dimension that the fsdp axis size
                   divides evenly (the first such if several tie) and
                   replicates it when none does. 'fsdp:<dim>' shards
                   dimension <dim> (negative: from the end, so that scan's
                   stacked copies match too) when the fsdp size divides it,
                   else falls back to 'fsdp'. Which dimension is sharded
                   decides whether XLA reduce-scatters a gradient or
                   all-reduces it whole and slices it (2x the bytes): on TPU
                   attention kernels [width, heads, head_dim] are reduced
                   whole unless sharded over heads (BENCHMARKS.md).

Shardings are data: the trainer gets abstract parameters from
`jax.eval_shape(init)`, turns them into shardings with `param_shardings`, the
optimizer state's with `state_shardings`, and passes both to
`jax.jit(..., out_shardings=...)`.
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lit_navit import rules
from lit_navit.models.partitioning import BATCH_AXES

FSDP = 'fsdp'
SHARDING_RULES = ('replicate', 'fsdp')


def default_config() -> ml_collections.ConfigDict:
  """Data parallel over every device; parameters fsdp-sharded when fsdp > 1."""
  config = ml_collections.ConfigDict()
  config.mesh = [('data', -1), ('fsdp', 1)]
  config.sharding_rules = [('.*', 'fsdp')]
  return config


def check_mesh(mesh) -> None:
  """Raises ValueError naming config.mesh unless it is [(axis, size)] over
  exactly the axes the shardings use, each size a positive int or -1."""
  def bad(why):
    return ValueError(f'config key mesh={mesh!r}: {why}; for example '
                      "[('data', -1), ('fsdp', 1)]")
  try:
    names = [name for name, _ in mesh]
    sizes = [size for _, size in mesh]
  except (TypeError, ValueError) as e:
    raise bad('expected a list of (axis name, size) pairs') from e
  if sorted(names) != sorted(BATCH_AXES):
    raise bad(f'the axes must be {BATCH_AXES}, each once')
  if any(isinstance(n, bool) or not isinstance(n, int) or not (n >= 1 or n == -1)
         for n in sizes):
    raise bad('each size must be a positive integer or -1 (the remaining devices)')
  if sizes.count(-1) > 1:
    raise bad('at most one size may be -1')


def make_mesh(config, devices=None) -> Mesh:
  """The mesh of config.mesh over `devices` (default: all, on every host)."""
  devices = jax.devices() if devices is None else list(devices)
  names = [name for name, _ in config.mesh]
  sizes = [size for _, size in config.mesh]
  check_mesh(config.mesh)
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes and len(devices) % known == 0:
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh={config.mesh} does not fit the '
                     f'{len(devices)} devices: sizes must multiply to it.')
  axis_types = (AxisType.Auto,) * len(names)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
  # Multi-slice: the first axis (data) spans the slices over the data-centre
  # network; every other axis stays inside a slice, on ICI.
  if sizes[0] % slices:
    raise ValueError(f'config.mesh={config.mesh}: its first axis ({names[0]}='
                     f'{sizes[0]}) must divide over the {slices} slices')
  array = mesh_utils.create_hybrid_device_mesh(
      [sizes[0] // slices, *sizes[1:]], [slices] + [1] * (len(sizes) - 1),
      devices=devices)
  return Mesh(array, names, axis_types=axis_types)


def process_count(mesh: Mesh) -> int:
  """The hosts holding the mesh's devices: from the devices, so that a plan
  for a topology without hardware counts its hosts, not this one process."""
  return len({d.process_index for d in mesh.devices.flat})


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices."""
  return mesh.devices.flat[0].platform


def _rule_dim(rule: str):
  """'fsdp:-2' -> -2; 'fsdp' -> None; ValueError for anything else."""
  if rule in SHARDING_RULES:
    return None
  name, _, dim = rule.partition(':')
  try:
    if name == FSDP and dim:
      return int(dim)
  except ValueError:
    pass
  raise ValueError(f'Unknown rule {rule!r} in config.sharding_rules: expected one of '
                   f"{SHARDING_RULES} or 'fsdp:<dim>'.")


def _fsdp_spec(shape, fsdp_size, dim=None):
  if dim is not None and -len(shape) <= dim < len(shape) and fsdp_size > 1:
    dim %= len(shape)
    if shape[dim] % fsdp_size == 0:
      return P(*(FSDP if d == dim else None for d in range(len(shape))))
  divisible = [d for d, n in enumerate(shape) if n % fsdp_size == 0]
  if fsdp_size == 1 or not divisible:
    return P()
  dim = max(divisible, key=lambda d: shape[d])
  return P(*(FSDP if d == dim else None for d in range(len(shape))))


def param_shardings(params, sharding_rules, mesh: Mesh):
  """A tree of NamedSharding for `params` (arrays or ShapeDtypeStructs)."""
  for _, rule in sharding_rules:
    _rule_dim(rule)
  fsdp_size = mesh.shape.get(FSDP, 1)

  def sharding(param, rule):
    spec = P() if rule == 'replicate' else _fsdp_spec(param.shape, fsdp_size,
                                                      _rule_dim(rule))
    return NamedSharding(mesh, spec)

  rule_tree = rules.match_rules(params, sharding_rules, 'config.sharding_rules')
  return jax.tree.map(sharding, params, rule_tree)


def state_shardings(abstract_state, abstract_params, param_shardings_tree,
                    mesh: Mesh):
  """Shardings of an optimizer state, from those of the parameters.

  optax states hold trees that mirror the parameters (Adam's moments), so a
  state leaf whose path ends with a parameter's path and whose shape is that
  parameter's gets its sharding; everything else (step counts, Adafactor's
  factored rows and columns) is replicated.
  """
  by_path = {}
  for path, param, sharding in zip(
      rules.tree_paths(abstract_params),
      jax.tree.leaves(abstract_params),
      jax.tree.leaves(param_shardings_tree)):
    by_path[path] = (param.shape, sharding)
  replicated = NamedSharding(mesh, P())

  def sharding_of(key_path, leaf):
    parts = rules.path_str(key_path).split('/')
    for start in range(len(parts)):  # Longest suffix first.
      shape, sharding = by_path.get('/'.join(parts[start:]), (None, None))
      if shape is not None:
        return sharding if shape == leaf.shape else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data and fsdp axes together."""
  return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays from each host's own rows (numpy, batch axis first)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _multihost_tpu() -> bool:
  hosts = (os.environ.get('TPU_PROCESS_ADDRESSES')
           or os.environ.get('TPU_WORKER_HOSTNAMES') or '')
  return ',' in hosts


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout: int = 100):
  """Joins the processes of a multi-host run; does nothing on a single host.

  Runs `jax.distributed.initialize` when given any argument, when
  JAX_COORDINATOR_ADDRESS is set, or on a multi-host TPU slice (where jax
  finds the coordinator itself); must come before any other jax call.
  When a process dies, the others stop with an error once it has missed
  heartbeats for `heartbeat_timeout` seconds, instead of waiting forever in
  a collective.
  """
  given = (coordinator_address, num_processes, process_id)
  if (any(x is not None for x in given)
      or os.environ.get('JAX_COORDINATOR_ADDRESS') or _multihost_tpu()):
    jax.distributed.initialize(*given, heartbeat_timeout_seconds=heartbeat_timeout)


def gather_from_processes(obj) -> list:
  """[obj of process 0, obj of process 1, ...] on every process; obj is JSON.

  The checkpoint is written by process 0, so per-process state (each host's
  input pipeline position) must reach it first.
  """
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array(len(data)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:length])) for row, length in zip(gathered, lengths)]


def run_on_process_0(fn):
  """fn() on process 0, its (JSON) result returned on every process.

  What one process must do alone (write a shared folder) while the others
  wait for it. An error there is raised on every process, the same type
  for a user error (ValueError, OSError), so none is left waiting in the
  next collective.
  """
  if jax.process_count() == 1:
    return fn()
  outcome, error = None, None
  if jax.process_index() == 0:
    try:
      outcome = {'value': fn()}
    except Exception as e:  # pylint: disable=broad-except
      error = e
      kind = next((t.__name__ for t in (ValueError, OSError) if isinstance(e, t)),
                  'RuntimeError')
      outcome = {'error': str(e), 'type': kind}
  outcome = gather_from_processes(outcome)[0]
  if error is not None:
    raise error
  if 'error' in outcome:
    kind = {'ValueError': ValueError, 'OSError': OSError}.get(outcome['type'],
                                                              RuntimeError)
    raise kind(f'process 0: {outcome["error"]}')
  return outcome['value']
