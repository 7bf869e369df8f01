"""What the interop CLIs share: a user error is one line and exit status 2.

Bad flags included: argparse's own usage-and-error is two lines.
"""

import argparse
import logging
import sys

from lit_navit import user_errors


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one `error:` line, exit status 2."""

  def __init__(self, doc: str, **kwargs):
    super().__init__(description=doc.split('\n')[0], **kwargs)
    self.add_argument('--debug', action='store_true',
                      help='show the traceback of a user error')

  def error(self, message):
    print(f'error: {message} (--help lists the flags)', file=sys.stderr)
    sys.exit(2)


def run(main, argv=None):
  """main(argv), a user error (ValueError, OSError) reported on one line."""
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  argv = sys.argv[1:] if argv is None else argv
  return user_errors.run(main, argv, debug='--debug' in argv)
