"""cpu_compiler_options: parsed like XLA_FLAGS, applied to the CPU compile,
and an option this jaxlib lacks costs a warning, not the run."""

import logging

import jax
import jax.numpy as jnp
import pytest

from lit_navit import config as config_lib
from lit_navit import xla_options


def lowered_matmuls():
  x = jnp.ones((64, 64), jnp.float32)
  return jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(x)


def test_parse_reads_xla_flags_syntax_and_names_a_bad_item():
  assert xla_options.parse('--a=1 --b= --c="x y"') == {'a': '1', 'b': '', 'c': 'x y'}
  assert xla_options.parse('') == {}
  for bad in ('a=1', '--a', '--=1'):
    with pytest.raises(ValueError, match='cpu_compiler_options'):
      xla_options.parse(bad)


def test_a_bad_config_value_stops_at_check_config():
  config = config_lib.default_config()
  config.cpu_compiler_options = 'xla_cpu_fast'
  with pytest.raises(ValueError, match="'xla_cpu_fast'"):
    config_lib.check_config(config)


def test_default_options_turn_ynn_fusions_off_and_keep_results():
  plain = lowered_matmuls().compile()
  tuned = xla_options.compile_step(lowered_matmuls(), xla_options.DEFAULT_CPU_OPTIONS,
                                   'cpu')
  assert '__ynn_fusion' in plain.as_text()  # what the default is there to remove
  assert '__ynn_fusion' not in tuned.as_text()
  x = jnp.linspace(-1, 1, 64 * 64, dtype=jnp.float32).reshape(64, 64)
  assert jnp.allclose(plain(x), tuned(x), rtol=1e-5, atol=1e-5)


def test_an_option_this_jaxlib_lacks_compiles_without_options(caplog):
  with caplog.at_level(logging.WARNING, logger='lit_navit'):
    compiled = xla_options.compile_step(lowered_matmuls(),
                                        '--xla_cpu_no_such_option=1', 'cpu')
  assert 'xla_cpu_no_such_option' in caplog.text
  assert compiled(jnp.ones((64, 64))).shape == (64, 64)


def test_options_apply_only_to_cpu_meshes():
  # A TPU step planned on this CPU host gets none of the CPU-only options
  # (TPU compiles reject them); the platform is the mesh's, not the host's.
  compiled = xla_options.compile_step(lowered_matmuls(),
                                      xla_options.DEFAULT_CPU_OPTIONS, 'tpu')
  assert '__ynn_fusion' in compiled.as_text()
