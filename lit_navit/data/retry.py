"""Retrying reads that failed for a transient storage error.

Object storage drops connections and times out now and then; a read that
failed with an OSError is tried again after an exponentially growing pause.
A missing file or a permission error is not transient and is not retried.
"""

import dataclasses
import logging
import time

_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
              PermissionError)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """`retries` more tries after the first, pausing delay, 2 delay, 4 delay..."""
  retries: int = 3
  delay: float = 0.5  # Seconds before the first retry.
  sleep: callable = time.sleep

  def pause(self, attempt: int) -> None:
    """Waits before retry number `attempt` (1-based)."""
    self.sleep(self.delay * 2 ** (attempt - 1))


def is_transient(error: BaseException) -> bool:
  return isinstance(error, OSError) and not isinstance(error, _PERMANENT)


def call(fn, policy: RetryPolicy, what: str):
  """fn(), tried again on a transient error; the last error is raised."""
  for attempt in range(policy.retries + 1):
    try:
      return fn()
    except OSError as e:
      if not is_transient(e) or attempt == policy.retries:
        raise
      logging.warning('reading %s failed (%s); try %d of %d', what, e,
                      attempt + 2, policy.retries + 1)
      policy.pause(attempt + 1)
  raise AssertionError('unreachable')
