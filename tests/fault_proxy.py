"""A front for the storage emulator that fails some requests, as Cloud Storage now and then does.

    proxy = FaultProxy("http://127.0.0.1:PORT", seed=0)   # serves on proxy.url, in a thread
    proxy.set(error_rate=0.1, cut_rate=0.02)              # 10% refused, 2% of bodies cut short
    proxy.set(down=True)                                  # every request refused
    proxy.close()

Every client is pointed at `proxy.url` instead of the emulator (tests/gcs_emulator.client_env).
Each request draws, from one seeded generator, what happens to it:
- refused (`error_rate`): answered 503 or 429 in GCS's JSON error form (alternately drawn),
  without reaching the emulator: the request had no effect, as with GCS's own 503s;
- cut (`cut_rate`): forwarded, and its answer's headers and the first half of its body sent,
  then the connection closed: the client sees a reset mid-body (a write has taken effect);
- delayed by `delay_s`, if set, before either.
`down=True` refuses everything with 503 (the store "stays down"). `counts` says how many
requests met each fate, so that a test can show its faults happened.
"""

from __future__ import annotations

import http.client
import http.server
import json
import random
import threading
import time
import urllib.parse


class FaultProxy:
  """A threaded HTTP proxy in front of `target` (http://host:port); see the module doc."""

  def __init__(self, target: str, seed: int = 0, error_rate: float = 0.0,
               cut_rate: float = 0.0, delay_s: float = 0.0):
    self.target = urllib.parse.urlsplit(target)
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self.error_rate, self.cut_rate, self.delay_s, self.down = error_rate, cut_rate, delay_s, False
    self.counts = {"passed": 0, "refused": 0, "cut": 0}
    self.by_client: dict[str, dict[str, int]] = {}  # the same, by the User-Agent's first word
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as GCS serves: clients reuse connections

      def log_message(self, *args):  # quiet
        del args

      def _any(self):
        proxy.handle(self)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    class Server(http.server.ThreadingHTTPServer):
      def handle_error(self, request, client_address):
        del request, client_address  # a connection this proxy cut, or its client dropped

    self._server = Server(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def set(self, **settings) -> None:
    with self._lock:
      for key, value in settings.items():
        if not hasattr(self, key) or key.startswith("_"):
          raise AttributeError(key)
        setattr(self, key, value)

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def _fate(self, client: str) -> tuple[str, int]:
    with self._lock:
      draw = self._rng.random()
      if self.down or draw < self.error_rate:
        fate = "refused"
      elif draw < self.error_rate + self.cut_rate:
        fate = "cut"
      else:
        fate = "passed"
      self.counts[fate] += 1
      mine = self.by_client.setdefault(client, {"passed": 0, "refused": 0, "cut": 0})
      mine[fate] += 1
      return fate, self._rng.choice((503, 429)) if not self.down else 503

  def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
    try:
      self._handle(request)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request
      request.close_connection = True

  def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
    body = _read_body(request)
    fate, status = self._fate((request.headers.get("User-Agent") or "-").split("/")[0])
    if self.delay_s:
      time.sleep(self.delay_s)
    if fate == "refused":
      message = ("We encountered an internal error. Please try again." if status == 503 else
                 "The rate of change requests to the object is too high.")
      payload = json.dumps({"error": {"code": status, "message": message, "errors": [
          {"message": message, "domain": "global",
           "reason": "backendError" if status == 503 else "rateLimitExceeded"}]}}).encode()
      request.send_response(status)
      request.send_header("Content-Type", "application/json; charset=UTF-8")
      request.send_header("Content-Length", str(len(payload)))
      request.end_headers()
      request.wfile.write(payload)
      return
    connection = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=120)
    try:
      headers = {k: v for k, v in request.headers.items()
                 if k.lower() not in ("host", "transfer-encoding", "content-length",
                                      "connection", "expect")}
      connection.request(request.command, request.path, body=body or None, headers=headers)
      answer = connection.getresponse()
      data = answer.read()
    finally:
      connection.close()
    request.send_response(answer.status, answer.reason)
    for key, value in answer.getheaders():
      if key.lower() not in ("transfer-encoding", "content-length", "connection", "server",
                             "date"):
        request.send_header(key, value)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    if fate == "cut" and request.command != "HEAD":
      request.wfile.write(data[:len(data) // 2])
      request.wfile.flush()
      request.close_connection = True
      request.connection.shutdown(2)  # a reset mid-body, not a clean end
      return
    request.wfile.write(data)


def _read_body(request) -> bytes:
  """The request's body, whether sent with a length or in chunks."""
  length = request.headers.get("Content-Length")
  if length is not None:
    return request.rfile.read(int(length))
  if "chunked" not in (request.headers.get("Transfer-Encoding") or "").lower():
    return b""
  chunks = []
  while True:
    size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
    if size == 0:
      while request.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass
      return b"".join(chunks)
    chunks.append(request.rfile.read(size))
    request.rfile.readline()
