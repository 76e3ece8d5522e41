"""`python -m tests.gcs_emulator --port=N`: gcp-storage-emulator, plus the response header
real Cloud Storage sends with every object download and the emulator leaves out.

`x-goog-generation` (https://cloud.google.com/storage/docs/xml-api/reference-headers):
TensorStore reads an object's generation from it and makes its conditional writes with
it; OCDBT, Orbax's checkpoint format, updates its manifest that way, and fails with
"Malformed StorageGeneration" without it.
"""

import sys

from gcp_storage_emulator import __main__ as emulator
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001  (not found: the emulator already answered 404)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # objects.get (alt=media) calls it by name
for _, handlers in server.HANDLERS:
  for method, handler in handlers.items():
    if handler is _download:
      handlers[method] = download

if __name__ == "__main__":
  emulator.main(sys.argv[1:])
