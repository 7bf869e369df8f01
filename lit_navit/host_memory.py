"""glibc malloc settings that keep a CPU training step's memory mapped.

XLA on CPU allocates each step's temporaries (2.8 GB for W1's B/16 step)
and frees them at its end. glibc gives such blocks back to the OS (large
blocks are mmap'd, per-thread arenas shrink), so the next step faults every
page in again: 0.7M page faults a step on W1. One arena, no mmap'd blocks
and no trimming keep the memory mapped from step to step: 0 faults, and the
step takes 0.86x the time (benchmarks/bench_train.py --our-env, BENCHMARKS.md).
The cost is that memory freed at the peak stays with the process.

The settings must be in place before the process starts (glibc reads
GLIBC_TUNABLES once), so the command-line entry points re-execute
themselves once with them. A GLIBC_TUNABLES already set, even empty, is the
user's choice and is left alone; `GLIBC_TUNABLES= python -m ...` opts out.
"""

import os
import sys

# 64 GiB: never trim (the value is a size_t; mallopt's int stops at 2 GiB).
TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            'glibc.malloc.trim_threshold=68719476736')


def _is_glibc() -> bool:
  try:
    return os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
  except (ValueError, OSError, AttributeError):  # Not a GNU libc.
    return False


def restart_with_tuned_malloc() -> None:
  """Re-executes this process (same interpreter, same arguments, same pid)
  with TUNABLES, unless GLIBC_TUNABLES is set or the libc is not glibc.

  Call it first thing in a `__main__` block, before any work: nothing done
  before it survives.
  """
  if 'GLIBC_TUNABLES' in os.environ or not _is_glibc():
    return
  os.environ['GLIBC_TUNABLES'] = TUNABLES
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
