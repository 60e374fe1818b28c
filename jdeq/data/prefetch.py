"""Preparing the next batches in a background thread while the consumer computes."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


def prefetch_in_thread(iterator: Iterator[T], size: int) -> Iterator[T]:
  """Yields ``iterator``'s items, computing up to ``size`` of them ahead.

  numpy releases the GIL in its copies and arithmetic, as JAX does while a step
  runs, so the producer thread overlaps with training. An exception in the
  producer is re-raised in the consumer; closing (or dropping) the returned
  generator stops the thread.
  """
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_DONE)
    except BaseException as error:  # handed to the consumer
      put(_Failure(error))

  thread = threading.Thread(target=produce, name="jdeq-data-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _DONE:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
