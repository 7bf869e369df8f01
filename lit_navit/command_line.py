"""Command lines of the config-driven commands (train, plan): big_vision's
`--config.a.b=value` overrides, split out of argv before absl sees it.
Parsing their values is config.py's (`apply_overrides`)."""

import os
import sys

from absl import app


def run(main_fn):
  """Runs main_fn(argv, overrides) under absl, the `--config.*` overrides
  split out first: they are ours to parse (config.py), and absl would
  refuse them as unknown flags."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.argv, overrides = split_overrides_or_exit(sys.argv)
  app.run(lambda argv: main_fn(argv, overrides), argv=sys.argv)


def split_overrides_or_exit(argv):
  """`split_overrides`, ending a malformed override with one line (exit 2)."""
  try:
    return split_overrides(argv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


OVERRIDE_PREFIX = '--config.'


def split_overrides(argv):
  """Splits `--config.a.b=value` (or `--config.a.b value`) out of argv.

  Returns (the other arguments, [(key, text)] in command-line order).
  """
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if not arg.startswith(OVERRIDE_PREFIX):
      rest.append(arg)
      continue
    key, sep, text = arg[len(OVERRIDE_PREFIX):].partition('=')
    if not sep:
      text = next(args, None)
      if text is None:
        raise ValueError(f'{arg} needs a value: {arg}=VALUE')
    overrides.append((key, text))
  return rest, overrides
