"""XLA compile options for the train step on CPU (config `cpu_compiler_options`).

Written as in XLA_FLAGS ('--name=value ...') but applied to the train step's
compilation only, and only when it runs on CPU, so that one config serves
CPU and accelerator runs. The default turns XLA's YNNPACK fusions off: the
B/16 and S/16 steps ran 4% and 14% faster without them, in every
interleaved round (BENCHMARKS.md). A jaxlib that lacks an option compiles
without them, with a warning: the options tune speed, never results.
"""

import logging
import shlex

import jax

log = logging.getLogger('lit_navit')

DEFAULT_CPU_OPTIONS = '--xla_cpu_experimental_ynn_fusion_type='


def parse(text: str) -> dict:
  """'--a=1 --b=' -> {'a': '1', 'b': ''}; ValueError naming a bad item."""
  options = {}
  for item in shlex.split(text or ''):
    name, sep, value = item.removeprefix('--').partition('=')
    if not item.startswith('--') or not sep or not name:
      raise ValueError(f'cpu_compiler_options: expected --name=value items, '
                       f'got {item!r}')
    options[name] = value
  return options


def compile_step(lowered, cpu_options: str, platform: str):
  """`lowered.compile()`, with `cpu_options` when `platform` (the mesh's
  devices') is CPU: a TPU step planned on a CPU host gets none of them."""
  options = parse(cpu_options) if platform == 'cpu' else {}
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    if 'No such compile option' not in str(e):
      raise
    log.warning('this jaxlib lacks an option of cpu_compiler_options %r (%s); '
                'compiling the train step without them', cpu_options, e)
    return lowered.compile()
