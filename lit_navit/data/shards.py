"""Which data files each host reads, epoch by epoch.

The files are numbered by their place in the sorted list of all data files;
every host lists the same files, so file numbers agree across hosts. Each
epoch the file order is reshuffled from (seed, epoch), the same on every
host, and cut between the hosts:

  F >= H files for H hosts: host h reads files order[h], order[h + H], ...
    (every file is read by exactly one host; hosts differ by at most one
    file an epoch).
  F < H: host h reads the single file order[h % F], shared with the other
    hosts h' where h' % F == h % F; of the k hosts sharing it, host h keeps
    the records whose number within the file is h // F modulo k. Every
    record is still kept by exactly one host, but each sharing host reads
    the whole file.
"""

import dataclasses

import numpy as np

from lit_navit.data import sources

_FILE_ORDER_TAG = 0x666f


@dataclasses.dataclass(frozen=True)
class Shard:
  """One file a host reads: the records numbered `offset` modulo `stride`."""
  file: int  # Number of the file in the sorted list of all data files.
  stride: int = 1
  offset: int = 0

  def keeps(self, record_number: int) -> bool:
    return record_number % self.stride == self.offset


def list_files(pattern_or_paths) -> list[str]:
  """The data files, sorted and without repeats (see `sources.expand_paths`)."""
  return sorted(set(sources.expand_paths(pattern_or_paths)))


def file_order(num_files: int, *, seed: int, epoch: int,
               shuffle: bool = True) -> np.ndarray:
  """Epoch `epoch`'s order of all files: a function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_files)
  rng = np.random.default_rng([seed, _FILE_ORDER_TAG, epoch])
  return rng.permutation(num_files)


def host_shards(num_files: int, *, seed: int, epoch: int, process_index: int,
                process_count: int, shuffle: bool = True) -> list[Shard]:
  """The shards host `process_index` reads in epoch `epoch`, in reading order."""
  if num_files < 1:
    raise ValueError(f'need at least one data file, got {num_files}')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index {process_index} not in [0, {process_count})')
  order = file_order(num_files, seed=seed, epoch=epoch, shuffle=shuffle)
  if num_files >= process_count:
    return [Shard(int(f)) for f in order[process_index::process_count]]
  first = process_index % num_files
  sharing = len(range(first, process_count, num_files))
  return [Shard(int(order[first]), sharing, process_index // num_files)]
