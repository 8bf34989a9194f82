"""gcp-storage-emulator (PyPI) as tests/test_object_store.py runs it: `python gcs_emulator.py
start --port N --in-memory --default-bucket B`, the emulator's own command line, with four
differences from its released behaviour, each toward what GCS itself does:

- Downloads carry `x-goog-generation` and `x-goog-metageneration`, as GCS's do. TensorStore's
  OCDBT driver (Orbax's default checkpoint format) reads an object's generation from them and
  fails with "Malformed StorageGeneration" without them.
- A suffix range (`Range: bytes=-N`, the last N bytes) is served as GCS serves it; the emulator
  ignores it and sends the whole object. google-cloud-cpp reads a file's tail so (Riegeli's
  postscript, under ArrayRecord's reader): an ArrayRecord file of more than ~1 MB was then
  unreadable ("Invalid Riegeli/records file: chunk boundary is ...").
- No metadata file: on every write the emulator serialises every object it holds into a JSON
  file that only a restart reads back (none here); with the objects of a few checkpoints that
  made each save quadratic.
- objects.move (`POST .../o/SRC/moveTo/o/DST`, what gcsfs renames with), as a copy and a
  delete: the emulator answers 501, which gcsfs retries with back-off for ~40 s per object
  before it copies and deletes itself.

- Preconditions: a write or delete with `ifGenerationMatch=G` is answered 412 unless the
  object's generation is G (0: the object must not exist), as GCS does; the emulator ignores
  them. The writer claim (workdir/writer.py) creates its object only if absent. The emulator
  serves one request at a time, so the check and the write cannot interleave.

And one switch for the tests: while a bucket holds an object named DENY_WRITES, every write to
it (an upload, a copy, a move) is answered 403 with GCS's words, as when the job's account
loses write access during a run; reads and deletes still pass, so the test can lift it.
"""

import os
import re
import runpy
import socket
import subprocess
import sys
import time

from http import HTTPStatus

from gcp_storage_emulator import server, settings, storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download
DENY_WRITES = ".deny-writes"


def _download_with_generation(request, response, store, *args, **kwargs):
  headers = request._request_handler.headers  # pylint: disable=protected-access
  suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("range") or "")
  if suffix:  # the last N bytes, as GCS serves them (the emulator would send the whole object)
    size = len(store.get_file(request.params["bucket_name"], request.params["object_id"]))
    headers.replace_header("range", f"bytes={max(0, size - int(suffix[1]))}-")
  _download(request, response, store, *args, **kwargs)
  if response.status.value < 300:
    obj = store.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


def _move(request, response, store, *args, **kwargs):
  del args, kwargs
  bucket, source, target = (request.params[k] for k in ("bucket_name", "object_id",
                                                        "dest_object_id"))
  # pylint: disable=protected-access
  try:
    moved = objects._copy(request.base_url, store, bucket, source, bucket, target)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(store, bucket, source)
  response.json(moved)


def _unless_denied(handler):
  def handle(request, response, store, *args, **kwargs):
    bucket = request.params.get("bucket_name")
    try:
      denied = bucket is not None and store.get_file_obj(bucket, DENY_WRITES) is not None
    except NotFound:
      denied = False
    if not denied:
      return handler(request, response, store, *args, **kwargs)
    response.status = HTTPStatus.FORBIDDEN
    message = ("emulator@test.iam.gserviceaccount.com does not have storage.objects.create "
               "access to the Google Cloud Storage object. Permission 'storage.objects.create' "
               "denied on resource (or it may not exist).")
    response.json({"error": {"code": 403, "message": message,
                             "errors": [{"message": message, "domain": "global",
                                         "reason": "forbidden"}]}})
    return None
  return handle


def _if_generation_match(handler):
  def handle(request, response, store, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    bucket = request.params.get("bucket_name")
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if wanted and bucket and name:
      try:
        current = str(store.get_file_obj(bucket, name)["generation"])
      except NotFound:
        current = "0"
      if current != wanted[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        message = "At least one of the pre-conditions you specified did not hold."
        response.json({"error": {"code": 412, "message": message, "errors": [
            {"message": message, "domain": "global", "reason": "conditionNotMet",
             "locationType": "header", "location": "If-Match"}]}})
        return None
    return handler(request, response, store, *args, **kwargs)
  return handle


def client_env(url: str) -> dict[str, str]:
  """The environment that points every storage client in our path at `url` (the emulator, or a
  front of it). EPATH_USE_TF=false, NO_GCE_CHECK and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT are read
  once per process, so conftest.py sets them before any test."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore, under Orbax and the writer claim
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp, under ArrayRecord's reader
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
      # The emulator serves one request at a time: TensorStore's default 32 in flight make it
      # time out and back off.
      "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "4",
      "GOOGLE_CLOUD_PROJECT": "test",
  }


def launch(port: int, bucket: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
  """This emulator in a process of its own, in memory, serving `bucket` on `port`, once it
  answers: (the process, its URL). Raises RuntimeError if it does not start."""
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "--port", str(port), "--in-memory",
       "--default-bucket", bucket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return proc, f"http://127.0.0.1:{port}"
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the storage emulator did not start") from None
      time.sleep(0.1)


def main():
  storage.Storage._write_config_to_file = lambda self: None  # pylint: disable=protected-access
  # objects.get calls the module's `download` for alt=media; the /download route holds the
  # function itself.
  objects.download = _download_with_generation
  move_routes = tuple(
      (rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
       rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: _move})
      for prefix in (settings.API_ENDPOINT, ""))
  server.HANDLERS = tuple(
      (route, {method: _if_generation_match(_unless_denied(fn))
                       if method in (server.POST, server.PUT) else
                       _if_generation_match(fn) if method == server.DELETE else fn
               for method, fn in handlers.items()})
      for route, handlers in move_routes + tuple(
          (route, {method: _download_with_generation if fn is _download else fn
                   for method, fn in handlers.items()})
          for route, handlers in server.HANDLERS))
  sys.argv[0] = "gcp-storage-emulator"
  runpy.run_module("gcp_storage_emulator", run_name="__main__")


if __name__ == "__main__":
  main()
