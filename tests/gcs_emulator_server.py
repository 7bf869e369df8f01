"""gcp-storage-emulator with the one response header it omits.

Real GCS sends `x-goog-generation` with every media download; the emulator
does not, so tensorstore reads an existing object as generation 0 and its
next conditional write (each update of an orbax OCDBT manifest) fails with
"Malformed StorageGeneration". This adds the header from the object's own
metadata. It also honours `ifGenerationMatch` on uploads and deletes (HTTP
412 when the object's generation differs, 0 meaning "absent"), as real GCS
does and the workdir lock relies on. The command line is the emulator's:

  python tests/gcs_emulator_server.py start --host 127.0.0.1 --port N ...
"""

import http
import http.server
import sys
import threading

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_emulator_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _emulator_download(request, response, storage, *args, **kwargs)
  if response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params['bucket_name'],
                               request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])


def _generation(storage, bucket, name) -> int:
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return 0


def _if_generation_match(handler, name_of):
  def checked(request, response, storage, *args, **kwargs):
    expected = request.query.get('ifGenerationMatch')
    if expected is not None:
      bucket = request.params['bucket_name']
      if _generation(storage, bucket, name_of(request)) != int(expected[0]):
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return None
    return handler(request, response, storage, *args, **kwargs)
  return checked


def _uploaded_name(request):
  if 'name' in request.query:
    return request.query['name'][0]
  return request.data['meta'].get('name')


# Before the server module is imported: its route table takes the handler
# functions as it finds them then.
objects.download = _download_with_generation
objects.insert = _if_generation_match(objects.insert, _uploaded_name)
objects.delete = _if_generation_match(objects.delete,
                                      lambda request: request.params['object_id'])

# One thread a connection. gcsfs keeps several keep-alive connections; the
# emulator's single-threaded server blocks reading an idle one while the
# request on another waits, and a recursive copy hung forever in CI so.
# (This process is the emulator alone, so replacing the class is local.)
# The emulator's state is not thread-safe (resumable uploads lost their
# sessions), so requests are still handled one at a time: only the waiting
# for a connection's next request runs in parallel.
http.server.HTTPServer = http.server.ThreadingHTTPServer
_ONE_AT_A_TIME = threading.Lock()

from gcp_storage_emulator import server as emulator_server  # pylint: disable=g-import-not-at-top,wrong-import-position


def _serialised(method):
  def handle(self):
    with _ONE_AT_A_TIME:
      return method(self)
  return handle


for _verb in ('GET', 'POST', 'DELETE', 'PUT', 'PATCH'):
  setattr(emulator_server.RequestHandler, f'do_{_verb}',
          _serialised(getattr(emulator_server.RequestHandler, f'do_{_verb}')))

from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  sys.exit(emulator.main(sys.argv[1:]))
