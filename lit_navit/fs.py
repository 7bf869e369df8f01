"""The one filesystem layer: every path the project reads or writes.

Local paths and URLs (gs://, and any other protocol fsspec knows) go through
fsspec, so `gs://bucket/data/*.tfrecord` works wherever a local path does.
For gs://, gcsfs honours STORAGE_EMULATOR_HOST (the tests point it at a
GCS-API emulator on 127.0.0.1).

Writes that must be all-or-nothing use `atomic_write`: locally a temporary
file renamed into place, on object storage a single upload (an object
appears only when its upload completes).

Orbax reaches gs:// through etils.epath (directories) and tensorstore
(arrays). epath would take tf.io.gfile, whose GCS endpoint is compiled in;
EPATH_USE_TF=false sends it through fsspec too, so one client (gcsfs)
serves every gs:// path we touch outside tensorstore.
"""

import builtins
import contextlib
import datetime
import os
import posixpath
import tempfile
import uuid

import fsspec

os.environ.setdefault('EPATH_USE_TF', 'false')


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://...) rather than a local path."""
  return '://' in os.fspath(path)


def filesystem(path: str):
  """(fsspec filesystem, path as that filesystem names it)."""
  path = os.fspath(path)
  if not is_remote(path):
    return fsspec.filesystem('file'), os.path.abspath(path)
  # fsspec caches the instance (and makes a new one in a forked child).
  # No listings cache: other processes (a training run, tensorstore) write
  # the same folders, and a stale listing would hide their files.
  fs = fsspec.filesystem(path.split('://', 1)[0], use_listings_cache=False)
  return fs, fs._strip_protocol(path)  # pylint: disable=protected-access


def _url(fs, stripped: str, like: str) -> str:
  """`stripped` named as `like` names paths: a URL, or a local path that is
  relative when `like` is."""
  if is_remote(like):
    return fs.unstrip_protocol(stripped)
  return stripped if os.path.isabs(like) else os.path.relpath(stripped)


def missing_bucket(path: str) -> str | None:
  """'gs://NAME' when `path` is on object storage and its bucket does not
  exist (so an error can say so rather than 'not found'); else None."""
  path = os.fspath(path)
  if not is_remote(path):
    return None
  protocol, rest = path.split('://', 1)
  bucket = f'{protocol}://{rest.split("/", 1)[0]}'
  return None if exists(bucket) else bucket


def absolute(path: str) -> str:
  """A local path made absolute; URLs as they are."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  path = os.fspath(path).rstrip('/')
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(os.fspath(path).rstrip('/'))


def open(path: str, mode: str = 'rb', **kwargs):  # pylint: disable=redefined-builtin
  """Opens a file for reading or writing ('b' for bytes, else text)."""
  path = os.fspath(path)
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  if 'b' not in mode:
    kwargs.setdefault('encoding', 'utf-8')
  return fsspec.open(path, mode, **kwargs).open()


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  with open(path, 'r', encoding='utf-8') as f:
    return f.read()


def exists(path: str) -> bool:
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  fs, p = filesystem(path)
  return fs.isdir(p)


def isfile(path: str) -> bool:
  fs, p = filesystem(path)
  return fs.isfile(p)


def size(path: str) -> int:
  fs, p = filesystem(path)
  return fs.size(p)


def stat(path: str) -> tuple[int, int]:
  """(size in bytes, modification time in ns since the epoch) of a file."""
  if not is_remote(path):
    result = os.stat(path)
    return result.st_size, result.st_mtime_ns
  fs, p = filesystem(path)
  info = fs.info(p)
  modified = info['mtime'] - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
  return int(info['size']), modified // datetime.timedelta(microseconds=1) * 1000


def listdir(path: str) -> list:
  """Names (not paths) in a directory, sorted; [] when it does not exist."""
  fs, p = filesystem(path)
  if not fs.isdir(p):
    return []
  return sorted(basename(entry) for entry in fs.ls(p, detail=False)
                if entry.rstrip('/') != p.rstrip('/'))


def glob(pattern: str) -> list:
  """Paths matching a glob pattern (*, ?, [..], ** across folders), sorted."""
  fs, p = filesystem(pattern)
  return sorted(_url(fs, match, pattern) for match in fs.glob(p))


def find(root: str) -> list:
  """Every file under the folder `root`, at any depth, sorted."""
  fs, p = filesystem(root)
  return sorted(_url(fs, match, root) for match in fs.find(p))


def makedirs(path: str) -> None:
  """Creates a folder and its parents (nothing to do on object storage)."""
  fs, p = filesystem(path)
  fs.makedirs(p, exist_ok=True)


def remove(path: str) -> None:
  fs, p = filesystem(path)
  fs.rm_file(p)
  _forget_listings(path)


def rmtree(path: str) -> None:
  fs, p = filesystem(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)
  _forget_listings(path)


def _forget_listings(path: str) -> None:
  """epath (so orbax) lists gs:// folders through its own fsspec instance,
  which caches listings: after a folder changes here, every instance of
  that filesystem must look again."""
  if is_remote(path):
    cls = type(filesystem(path)[0])
    for instance in list(getattr(cls, '_cache', {}).values()):
      instance.invalidate_cache()


def rename(source: str, target: str) -> None:
  """Moves a file or folder to a new name (atomic for a local file; on object
  storage a copy, then a delete). Never onto an existing target: a folder
  would be merged into it on object storage."""
  if exists(target):
    raise FileExistsError(f'cannot move {source} to {target}: it exists')
  if not is_remote(source):
    os.replace(source, target)
    return
  fs, s = filesystem(source)
  # Not fs.mv: gcsfs tries a move API first that not every server has.
  fs.copy(s, filesystem(target)[1], recursive=True)
  fs.rm(s, recursive=True)
  _forget_listings(source)


def read_versioned(path: str) -> tuple[bytes, object]:
  """(contents, version) of a file; the version changes with every write
  (the object's generation on object storage)."""
  if not is_remote(path):
    with builtins.open(path, 'rb') as f:
      status = os.fstat(f.fileno())
      return f.read(), (status.st_ino, status.st_mtime_ns)
  fs, p = filesystem(path)
  # The generation first: should a write land between the two, the
  # contents are newer than the version, and a write on that version fails.
  generation = int(fs.info(p)['generation'])
  return fs.cat_file(p), generation


def write_if_version(path: str, data: bytes, version=None):
  """Writes `path` only if it is still at `version` (None: only if it does
  not exist); returns the new version, or raises FileExistsError.

  On object storage the server decides (a generation precondition), so of
  two writers exactly one wins. Locally creating is exclusive (O_EXCL); a
  rewrite compares, then renames a new file into place.
  """
  path = os.fspath(path)
  if is_remote(path):
    fs, p = filesystem(path)
    bucket, key, _ = fs.split_path(p)
    # gcsfs has no conditional write but a create-only one; the upload API
    # takes any ifGenerationMatch (a mismatch is HTTP 412: FileExistsError).
    result = fs.call('POST', f'{fs._location}/upload/storage/v1/b/{bucket}/o',  # pylint: disable=protected-access
                     uploadType='media', name=key, ifGenerationMatch=str(version or 0),
                     data=data, json_out=True)
    _forget_listings(path)
    return int(result['generation'])
  if version is None:
    # Written aside, then linked into place (which fails if the name
    # exists): no reader ever sees it half written.
    staged = f'{path}.new-{uuid.uuid4().hex[:8]}'
    with atomic_write(staged) as f:
      f.write(data)
    try:
      os.link(staged, path)
    finally:
      os.remove(staged)
  else:
    if read_versioned(path)[1] != version:
      raise FileExistsError(f'{path} changed')
    with atomic_write(path) as f:
      f.write(data)
  return read_versioned(path)[1]


def remove_if_version(path: str, version) -> None:
  """Removes `path` only if it is still at `version` (FileExistsError if not)."""
  if not is_remote(path):
    if read_versioned(path)[1] != version:
      raise FileExistsError(f'{path} changed')
    os.remove(path)
    return
  fs, p = filesystem(path)
  bucket, key, _ = fs.split_path(p)
  fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(version))
  _forget_listings(path)


def download(path: str, local_path: str) -> None:
  """Copies a file (local or remote) to a local path."""
  fs, p = filesystem(path)
  fs.get_file(p, local_path)


def upload(local_path: str, path: str) -> None:
  """Copies a local file to `path` whole (one upload on object storage)."""
  if not is_remote(path):
    with atomic_write(path) as f, builtins.open(local_path, 'rb') as source:
      f.write(source.read())
    return
  fs, p = filesystem(path)
  fs.put_file(local_path, p)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', **kwargs):
  """Writes `path` whole or not at all: a crash leaves the old file (or none)."""
  path = os.fspath(path)
  if 'b' not in mode:
    kwargs.setdefault('encoding', 'utf-8')
  if is_remote(path):
    # Staged in a local file, then one upload: the object appears whole
    # when the upload completes, and never when the writer fails.
    fs, p = filesystem(path)
    with tempfile.TemporaryDirectory(prefix='lit_navit-upload-') as staging:
      local = os.path.join(staging, basename(path))
      with builtins.open(local, mode, **kwargs) as f:
        yield f
      fs.put_file(local, p)
    return
  temporary = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    with builtins.open(temporary, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
