"""Command-line config overrides: every key settable, the README's commands
parse, and user errors end in one line naming the key."""

import glob
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from lit_navit import command_line
from lit_navit import config as config_lib
from lit_navit import sharding
from lit_navit import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_config.py')
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))) + [TINY]


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield prefix + key, value


def _as_text(value):
  """How a user would type `value` on the command line."""
  if isinstance(value, (str, bool, int, float)):
    return str(value)
  return repr(value)


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def _override(config, *args):
  rest, overrides = command_line.split_overrides(['prog', *args])
  assert rest == ['prog']
  config_lib.apply_overrides(config, overrides)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_key_of_every_config_is_settable_from_the_command_line(path):
  config = config_lib.load_config_file(path)
  for key, value in _leaves(config):
    fresh = config_lib.load_config_file(path)
    _override(fresh, f'--config.{key}={_as_text(value)}')
    assert _get(fresh, key) == value, key
    config_lib.check_config(fresh)


def test_mesh_list_override_builds_that_mesh():
  config = config_lib.load_config_file(TINY)
  _override(config, "--config.mesh=[('data', -1), ('fsdp', 4)]")
  config_lib.check_config(config)
  assert config.mesh == [('data', -1), ('fsdp', 4)]
  assert dict(sharding.make_mesh(config).shape) == {'data': 2, 'fsdp': 4}


def test_overrides_parse_by_the_keys_type():
  config = config_lib.load_config_file(TINY)
  _override(config, '--config.input.patch_sizes=16', '--config.model.t_init=2.5',
            '--config.input.resolution.max_tokens', '64',
            '--config.checkpoint.async_save=false', '--config.init_from=/a b')
  assert config.input.patch_sizes == (16,)
  assert config.model.t_init == 2.5 and config.input.resolution.max_tokens == 64
  assert config.checkpoint.async_save is False and config.init_from == '/a b'
  for arg, named in [('--config.foo=1', "'foo'"), ('--config.input.foo.bar=1', "'input.foo'"),
                     ('--config.input=1', 'group of keys'),
                     ('--config.input.patch_sizes=abc', 'patch_sizes'),
                     ('--config.checkpoint.every=often', 'checkpoint.every'),
                     ('--config.shuffle=maybe', "'shuffle'")]:
    with pytest.raises(ValueError, match=re.escape(named)):
      _override(config_lib.load_config_file(TINY), arg)
  config = config_lib.load_config_file(TINY)
  _override(config, "--config.input.patch_sizes=(8, 'a')")
  with pytest.raises(ValueError, match='input.patch_sizes'):
    train.train(config, '/nonexistent/never/written')


def _readme_train_commands():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    blocks = re.findall(r'```sh\n(.*?)```', f.read(), re.S)
  commands = []
  for block in blocks:
    for command in block.replace('\\\n', ' ').splitlines():
      if 'lit_navit.train' in command:
        commands.append(shlex.split(command))
  return commands


def test_readme_training_commands_parse_and_check():
  commands = _readme_train_commands()
  assert len(commands) >= 4
  assert any('--config.mesh' in ' '.join(c) for c in commands)
  for argv in commands:
    rest, overrides = command_line.split_overrides(argv)
    spec = rest[rest.index('--config') + 1]
    config = config_lib.load_config_file(os.path.join(ROOT, spec))
    config_lib.apply_overrides(config, overrides)
    config_lib.check_config(config)
    for key, text in overrides:
      assert _get(config, key) is not None, (key, text)


def _train(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'lit_navit.train', f'--config={TINY}',
                         '--workdir=/nonexistent/never/written', *args], env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_training_user_errors_are_one_line():
  for arg, named in [('--config.foo=1', "'foo' is unknown"),
                     ('--config.input.patch_sizes=abc', '--config.input.patch_sizes')]:
    proc = _train(arg)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith('error:') and named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = _train('--config.foo=1', '--debug')
  assert proc.returncode != 0 and 'Traceback' in proc.stderr


@pytest.mark.parametrize('override, named', [
    ('--config.optim.lr=-0.001', 'optim.lr must be >= 0'),
    ('--config.optim.lr=nan', 'optim.lr must be >= 0'),
    ('--config.total_steps=0', 'total_steps must be at least 1'),
    ("--config.mesh=[('data', -1)]", "config key mesh=[('data', -1)]: the axes must be"),
    ("--config.mesh=[('data', 0), ('fsdp', 1)]", 'each size must be a positive'),
    ("--config.mesh=[('data', -1), ('fsdp', -1)]", 'at most one size may be -1'),
    ("--config.mesh=['data']", 'list of (axis name, size) pairs'),
])
def test_values_that_cannot_train_are_refused_naming_the_key(override, named):
  config = config_lib.load_config_file(TINY)
  _override(config, override)
  with pytest.raises(ValueError, match=re.escape(named)):
    config_lib.check_config(config)


@pytest.mark.slow
def test_a_typo_in_a_config_arg_is_one_line():
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-m', 'lit_navit.train', f'--config={TINY}:stepz=4',
                         '--workdir=/nonexistent/never/written'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: config arg 'stepz' is unknown"), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
