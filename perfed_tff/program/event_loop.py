"""`run_sync`: TFF's asynchronous program pieces from synchronous code, also
where an event loop is already running (Jupyter, Colab).

TFF's training loop (`tff.simulation.run_training_process`) calls
`asyncio.get_event_loop().run_until_complete`, and its state and release
managers are coroutines; in a thread whose event loop is running (a notebook
cell) both fail. `run_sync(work)` runs `work` (a coroutine, or a function
that runs its own `run_until_complete`) with a new event loop, in a helper
thread when one is already running there, under the caller's TFF context
(TFF's context stack is per thread: `tff.framework.get_context_stack()`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Optional

import tensorflow_federated as tff


def run_sync(work, stop: Optional[threading.Event] = None):
  """Runs `work` to completion with a new asyncio event loop set for it and
  returns its result. Where a loop is already running in this thread, it
  runs in a helper thread; an interrupt of the waiting thread then sets
  `stop` (which the training loop honours between rounds) and waits for the
  helper to finish."""
  if asyncio.iscoroutine(work):
    coroutine = work
    work = lambda: asyncio.get_event_loop().run_until_complete(coroutine)

  def call():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
      return work()
    finally:
      asyncio.set_event_loop(None)
      loop.close()

  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return call()
  stack = tff.framework.get_context_stack()
  context = stack.current

  def call_in_context():
    with stack.install(context):
      return call()

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(call_in_context)
    try:
      return future.result()
    except KeyboardInterrupt:
      if stop is not None:
        stop.set()
      concurrent.futures.wait([future])
      raise
