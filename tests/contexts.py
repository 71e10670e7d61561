"""The TFF execution contexts the test rings run in (no tests).

* `tff_stock_context()`: TFF's own `set_sync_local_cpp_execution_context()`
  (the library and the training program are tested as a TFF user runs
  them). TFF's context starts a `worker_binary` that outlives Python and
  holds the test runner's pipes open; leaving the block collects the
  context while the interpreter is whole (its finalizer stops its worker)
  and stops any `worker_binary` child of this process that is left.
* `owned_context()` / `accelerated_context()`: the optional outer ring's
  `perfed_tff.runtime.ExecutionContext` and
  `perfed_tff.accelerator.AcceleratedContext`.
"""

import contextlib
import gc
import signal
import subprocess
import time

import psutil
import pytest


def worker_children() -> list:
  """The running `worker_binary` processes that are children of this
  process (a zombie, stopped but not yet reaped by its parent object, is not
  running)."""
  me = psutil.Process()
  out = []
  for p in me.children(recursive=True):
    try:
      if ('worker_binary' in ' '.join(p.cmdline() or [])
          and p.status() != psutil.STATUS_ZOMBIE):
        out.append(p)
    except psutil.Error:
      pass
  return out


def stop_worker_children(timeout: float = 5.0) -> None:
  """Stops the `worker_binary` children (SIGINT, then SIGKILL). They are
  not reaped here: the object that started one (TFF's `ServiceManager`)
  reaps it when it is collected."""
  children = worker_children()
  for p in children:
    try:
      p.send_signal(signal.SIGINT)
    except psutil.Error:
      pass
  deadline = time.monotonic() + timeout
  while worker_children() and time.monotonic() < deadline:
    time.sleep(0.05)
  for p in worker_children():
    try:
      p.kill()
    except psutil.Error:
      pass


def stop_tff_service_managers() -> None:
  """Stops the worker of every TFF `ServiceManager` still alive (one a
  failed test's traceback holds on to, say) and makes its finalizer a
  no-op: run at interpreter teardown, it fails ("Exception ignored in
  ServiceManager.__del__")."""
  for obj in gc.get_objects():
    kind = type(obj)
    if (kind.__name__ != 'ServiceManager'
        or not kind.__module__.endswith('executor_factory')):
      continue
    process = getattr(obj, '_process', None)
    if isinstance(process, subprocess.Popen) and process.poll() is None:
      process.send_signal(signal.SIGINT)
      try:
        process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    kind.__del__ = lambda self: None


@contextlib.contextmanager
def tff_stock_context():
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  stack = tff.framework.get_context_stack()
  previous = stack.current
  tff.backends.native.set_sync_local_cpp_execution_context()
  try:
    yield  # Not the context: a reference held on would keep it alive.
  finally:
    tff.framework.set_default_context(previous)
    gc.collect()  # Its finalizer stops its worker.
    stop_tff_service_managers()
    stop_worker_children()


@contextlib.contextmanager
def owned_context(**kwargs):
  from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
  with execution.ExecutionContext(**kwargs) as context:
    yield context


@contextlib.contextmanager
def accelerated_context(**kwargs):
  from perfed_tff.accelerator import context as context_lib  # pylint: disable=g-import-not-at-top
  with context_lib.AcceleratedContext(**kwargs) as context:
    yield context


RING_CONTEXTS = {'tff': tff_stock_context, 'owned': owned_context,
                 'accelerated': accelerated_context}


def ring_fixture(runtime: str):
  """A package fixture opening the context of `runtime` for the package's
  tests; the training program's runs there use that runtime
  (`tff_helpers.training_config`). The fixture's value is the context
  (None for TFF's own)."""

  @pytest.fixture(scope='package', autouse=True)
  def tff_context():
    from tests import tff_helpers  # pylint: disable=g-import-not-at-top
    previous = tff_helpers.PROGRAM_CONFIG['runtime']
    tff_helpers.PROGRAM_CONFIG['runtime'] = runtime
    try:
      with RING_CONTEXTS[runtime]() as context:
        yield context
    finally:
      tff_helpers.PROGRAM_CONFIG['runtime'] = previous

  return tff_context
