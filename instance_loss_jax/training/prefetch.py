"""Batches placed on the devices ahead of the step that uses them.

The train step is dispatched asynchronously, but whatever the host does between two dispatches
(pulling the next batch out of tf.data, checking it, assembling global arrays and starting
their host-to-device copy) leaves the devices idle whenever the loop waits on them (a log
line's metrics, a checkpoint, the end of the dispatch queue). A thread does that work here,
`size` batches ahead, so the copy of batch n+1 overlaps step n: flax's imagenet example and
big_vision keep batches on the device ahead of the step in the same way.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

_END = object()


class DevicePrefetch:
  """Iterates `place(batch)` for each batch of `batches`, computed `size` ahead in a thread.

  `size` placed batches wait in a queue, and the thread holds one more while it waits for room:
  size + 1 batches on the devices beside the one in use. size 0 places each batch when it is
  asked for (no thread). An error in the thread (a corrupt image, a batch that does not fit the
  config) is raised by the `next()` that would have returned that batch; batches before it come
  first, in order. `close()` (or leaving a `with`) stops the thread once it has placed the batch
  in hand, and waits for it.
  """

  def __init__(self, batches: Iterable[dict[str, Any]], place: Callable[[dict], dict],
               size: int):
    if size < 0:
      raise ValueError(f"device prefetch size must be >= 0, got {size}")
    self._batches, self._place, self._size = iter(batches), place, size
    self._closed = threading.Event()
    self._done = False
    self._queue: queue.Queue | None = None
    if size:
      self._queue = queue.Queue(maxsize=size)
      self._thread = threading.Thread(target=self._fill, name="device_prefetch", daemon=True)
      self._thread.start()

  def _put(self, item) -> bool:
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for batch in self._batches:
        if not self._put((self._place(batch), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by __next__)
      self._put((None, e))
      return
    self._put((_END, None))

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._queue is None:
      return self._place(next(self._batches))
    if self._done:
      raise StopIteration
    placed, error = self._queue.get()
    if error is not None or placed is _END:
      self._done = True
      if error is not None:
        raise error
      raise StopIteration
    return placed

  def close(self, timeout: float = 60.0) -> None:
    """Stops the thread and waits for it: a daemon thread still inside JAX or TensorFlow when
    the interpreter shuts down can abort the process (a preempted run then exits with SIGABRT
    instead of its own status)."""
    self._closed.set()
    if self._queue is not None and self._thread.is_alive():
      self._thread.join(timeout)

  def __enter__(self) -> "DevicePrefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
