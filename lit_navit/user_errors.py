"""Commands end a user error with one line that names the culprit, not a
traceback; `--debug` shows the traceback instead.

A user error is what the user can fix: a bad flag, config key or value, a
missing or malformed file (ValueError and OSError, which is how this project
reports them, always naming the key, file or line).
"""

import sys

USER_ERRORS = (ValueError, OSError)


def run(fn, *args, debug: bool = False):
  """Returns fn(*args); on a user error prints it on one line and exits 2."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    if debug:
      raise
    message = ' '.join(str(e).split('\n'))
    print(f'error: {message} (--debug shows the traceback)', file=sys.stderr)
    sys.exit(2)
