"""gcp-storage-emulator with the one response header it omits.

Real GCS sends `x-goog-generation` with every media download; the emulator
does not, so tensorstore reads an existing object as generation 0 and its
next conditional write (each update of an orbax OCDBT manifest) fails with
"Malformed StorageGeneration". This adds the header from the object's own
metadata and runs the emulator's command line unchanged otherwise:

  python tests/gcs_emulator_server.py start --host 127.0.0.1 --port N ...
"""

import http
import sys

from gcp_storage_emulator.handlers import objects

_emulator_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _emulator_download(request, response, storage, *args, **kwargs)
  if response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params['bucket_name'],
                               request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])


# Before the server module is imported: its route table takes the handler
# functions as it finds them then.
objects.download = _download_with_generation

from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  sys.exit(emulator.main(sys.argv[1:]))
