"""TFF execution contexts whose C++ worker processes this library owns.

TFF's `tff.backends.native.create_sync_local_cpp_execution_context()` starts a
`worker_binary` child that inherits the parent's stdout/stderr and is killed
only when its Python manager is garbage collected. Such a child can outlive the
interpreter and keep a pipe open, so `pytest | tee log` (or a CI runner) waits
forever. Here the worker is started explicitly:

* its output goes to a log file (never the parent's pipes),
* it receives SIGTERM when the parent process dies, even by SIGKILL
  (Linux `PR_SET_PDEATHSIG`),
* it is stopped at interpreter exit, on SIGTERM/SIGINT, and when the
  `ExecutionContext` that started it is closed.

The same `worker_binary` served on other hosts is TFF's multi-machine engine:
`ExecutionContext(workers=['host:port', ...])` connects to such workers and
spreads every round's clients over them with
`tff.backends.native.create_mergeable_comp_execution_context`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Optional, Sequence

import grpc
import portpicker
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import executors_errors
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.types import placements
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

from perfed_tff.runtime import compilation
from perfed_tff.runtime.worker import worker_binary_path

_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_BYTES),
]
_PR_SET_PDEATHSIG = 1


def _die_with_parent():  # Runs in the child between fork and exec.
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except OSError:  # Not Linux: atexit and signal handlers still apply.
    pass
  _default_signals()


def _default_signals():
  # An ignored signal stays ignored across exec: a parent started with
  # SIGINT ignored must still be able to stop its worker with SIGINT.
  # (libc, not `signal.signal`: Popen may run outside the main thread.)
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      libc.signal(int(signum), 0)  # 0: SIG_DFL
  except OSError:
    pass


class WorkerProcess:
  """One `worker_binary` process serving TFF's executor service on a port.

  Args:
    port: TCP port to serve on; a free one is picked when `None`.
    max_concurrent_computation_calls: TFF's limit on concurrent calls of one
      computation inside the worker (clients run in parallel up to this);
      nonpositive means unlimited.
    log_path: file for the worker's output; a temporary file when `None`
      (deleted by `stop()`; copy it first with `keep_log` to keep it).
    die_with_parent: stop the worker when this Python process dies.

  The worker runs in its own session, so a Ctrl-C on the terminal reaches
  only the Python process, which decides (an ignored SIGINT stays ignored
  and leaves the worker running).
  """

  def __init__(
      self,
      port: Optional[int] = None,
      *,
      max_concurrent_computation_calls: int = -1,
      log_path: Optional[str] = None,
      die_with_parent: bool = True,
  ):
    self.port = port or portpicker.pick_unused_port()
    self._temporary_log = log_path is None
    if log_path is None:
      fd, log_path = tempfile.mkstemp(prefix='tff_worker_', suffix='.log')
      os.close(fd)
    self.log_path = log_path
    self._log = open(log_path, 'ab')
    args = [
        worker_binary_path(),
        f'--port={self.port}',
        f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
    ]
    self.process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=self._log,
        stderr=subprocess.STDOUT,
        close_fds=True,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent else _default_signals,
    )
    _LIVE_WORKERS.add(self)

  @property
  def pid(self) -> int:
    return self.process.pid

  @property
  def address(self) -> str:
    return f'localhost:{self.port}'

  def running(self) -> bool:
    return self.process.poll() is None

  def frozen(self) -> bool:
    """Whether the process is stopped (SIGSTOP, SIGTSTP, a debugger)."""
    try:
      with open(f'/proc/{self.pid}/stat') as f:
        state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
      return False
    return state in ('T', 't')

  def kill(self) -> None:
    """SIGKILL (a stopped process dies too) and reap."""
    if self.process.poll() is None:
      try:
        self.process.kill()
        self.process.send_signal(signal.SIGCONT)
      except ProcessLookupError:
        pass
      self.process.wait()

  def keep_log(self, path: str) -> Optional[str]:
    """Copies the worker's log to `path` (for a failed run); returns `path`,
    or None when there is nothing to copy."""
    try:
      if not self._log.closed:
        self._log.flush()
      if os.path.getsize(self.log_path) == 0:
        return None
      shutil.copyfile(self.log_path, path)
      return path
    except OSError:
      return None

  def stop(self, timeout: float = 10.0) -> None:
    """Stops the worker (SIGINT, then SIGKILL after `timeout` seconds) and
    deletes its temporary log."""
    if self.process.poll() is None:
      try:
        if self.frozen():
          raise subprocess.TimeoutExpired(self.process.args, 0)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.kill()
      except ProcessLookupError:
        pass
    if not self._log.closed:
      self._log.close()
    if self._temporary_log:
      try:
        os.remove(self.log_path)
      except OSError:
        pass
    _LIVE_WORKERS.discard(self)


_LIVE_WORKERS: set[WorkerProcess] = set()
_HANDLERS_INSTALLED = False
_HANDLER_LOCK = threading.Lock()


def stop_all_workers() -> None:
  """Stops every worker this process started and has not stopped yet."""
  for worker in list(_LIVE_WORKERS):
    worker.stop(timeout=5.0)


def _install_exit_handlers() -> None:
  """Stops workers at exit and on SIGTERM/SIGINT/SIGHUP (then behaves as
  before); a signal that is ignored stays ignored and stops nothing."""
  global _HANDLERS_INSTALLED
  with _HANDLER_LOCK:
    if _HANDLERS_INSTALLED:
      return
    _HANDLERS_INSTALLED = True
  atexit.register(stop_all_workers)
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    previous = signal.getsignal(signum)
    if previous in (signal.SIG_IGN, None):
      continue

    def handler(sig, frame, previous=previous):
      stop_all_workers()
      if callable(previous):
        return previous(sig, frame)
      if previous == signal.SIG_IGN:
        return None
      # Default action: die by the same signal so the exit status says so.
      signal.signal(sig, signal.SIG_DFL)
      os.kill(os.getpid(), sig)

    signal.signal(signum, handler)


class WorkerUnavailableError(ConnectionError):
  """A TFF worker stopped answering and did not come back in time."""


class RoundTimeoutError(WorkerUnavailableError):
  """A round (or evaluation, or checkpoint write) ran past its deadline."""


# -------------------------------------------------------------- health check

def probe(address: str, timeout: float) -> bool:
  """Whether the gRPC server at `address` completes a new connection within
  `timeout` seconds. A frozen (SIGSTOPped) or partitioned worker does not,
  even while the kernel still holds its old connections open; a busy one
  does (its gRPC threads answer while it computes)."""
  channel = grpc.insecure_channel(
      address, [('grpc.use_local_subchannel_pool', 1)])
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return True
  except grpc.FutureTimeoutError:
    return False
  finally:
    channel.close()


def wait_until_ready(stub, address: str, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while not stub.is_ready:
    if time.monotonic() > deadline:
      raise WorkerUnavailableError(
          f'TFF worker at {address} did not become ready within '
          f'{timeout:.0f}s; is `python -m perfed_tff.runtime.worker --port=PORT` '
          'running there?'
      )
    time.sleep(0.05)


_STUB_METHODS = ('get_executor', 'create_value', 'create_struct',
                 'create_call', 'create_selection', 'compute', 'dispose',
                 'dispose_executor')


class _BoundedRetryStub(remote_executor_grpc_stub.RemoteExecutorGrpcStub):
  """A gRPC stub whose connection failures end in a clear error.

  TFF's async context retries a `RetryableError` (gRPC UNAVAILABLE, ...)
  forever. Here a retryable failure first waits up to `retry_timeout` seconds
  for the worker's channel to become ready again: if it does, the error is
  re-raised for TFF to retry (at most `max_retries` times in a row); if not,
  `WorkerUnavailableError` (not retryable) names the worker.
  """

  def __init__(self, channel, address: str, retry_timeout: float,
               max_retries: int = 3):
    super().__init__(channel)
    self._address = address
    self._retry_timeout = retry_timeout
    self._max_retries = max_retries
    self._failures = 0
    self._dead: Optional[WorkerUnavailableError] = None
    for name in _STUB_METHODS:
      setattr(self, name, self._bounded(getattr(self, name)))

  @property
  def address(self) -> str:
    return self._address

  def abort(self, error: WorkerUnavailableError) -> None:
    """Fails every call in flight and every later one with `error` (the
    channel is closed: gRPC cancels the calls waiting on it)."""
    if self._dead is None:
      self._dead = error
    try:
      self._channel.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _bounded(self, method):
    def call(request):
      if self._dead is not None:  # Calls in flight fail at once, not in turn.
        raise type(self._dead)(str(self._dead))
      try:
        response = method(request)
      except executors_errors.RetryableError as e:
        if self._dead is not None:
          raise type(self._dead)(str(self._dead)) from None
        self._on_retryable(e)
        raise
      except Exception:  # pylint: disable=broad-except
        if self._dead is not None:  # Cancelled by `abort`.
          raise type(self._dead)(str(self._dead)) from None
        raise
      self._failures = 0
      return response
    return call

  def _on_retryable(self, error) -> None:
    self._failures += 1
    if self._failures > self._max_retries:
      self._dead = WorkerUnavailableError(
          f'TFF worker at {self._address} failed {self._failures} times in a '
          'row with a retryable gRPC error; giving up.')
      raise self._dead from error
    try:
      grpc.channel_ready_future(self._channel).result(
          timeout=self._retry_timeout)
    except grpc.FutureTimeoutError:
      self._dead = WorkerUnavailableError(
          f'TFF worker at {self._address} is unreachable and did not come '
          f'back within {self._retry_timeout:g}s (was it stopped or killed?).')
      raise self._dead from None


def _executor_factory(address: str, default_num_clients: int,
                      ready_timeout: float, retry_timeout: float,
                      stubs: Optional[list] = None, wait: bool = True):
  """A TFF executor factory that talks gRPC to the worker at `address`
  (its stub is appended to `stubs` when given). `wait=False` waits for the
  worker to accept connections only when the first computation needs it
  (a local worker then starts while the program traces its computations)."""
  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  stub = _BoundedRetryStub(channel, address, retry_timeout)
  if stubs is not None:
    stubs.append(stub)
  ready = []
  if wait:
    wait_until_ready(stub, address, ready_timeout)
    ready.append(True)

  def stack_fn(cardinalities):
    if not ready:
      wait_until_ready(stub, address, ready_timeout)
      ready.append(True)
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    executor = remote_executor.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return python_executor_stacks.ResourceManagingExecutorFactory(stack_fn)


def _context_kwargs(graph_optimization: str, local_worker: bool):
  return dict(
      compiler_fn=compilation.compiler_fn(graph_optimization,
                                          local_worker=local_worker),
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )


_OPEN_CONTEXTS: list = []


class ExecutionContext:
  """Installs a TFF execution context and owns the workers behind it.

  With no `workers`, starts one local `worker_binary` (like TFF's default C++
  context). With `workers=['host:port', ...]`, connects to running workers
  (see `python -m perfed_tff.runtime.worker`); with more than one, each round's clients
  are split across them by TFF's mergeable-computation context.

  Use as a context manager, or call `close()`; either way, workers started here
  are also stopped at interpreter exit and on SIGTERM/SIGINT.

  Args:
    workers: addresses of already running workers; `None` starts a local one.
    max_concurrent_computation_calls: client computations a locally started
      worker runs at once; default: the number of CPU cores (-1: unlimited).
    default_num_clients: cardinality used when TFF cannot infer it.
    ready_timeout: seconds to wait for each worker to accept connections.
    retry_timeout: when a worker stops answering mid-computation, seconds to
      wait for it to come back before `WorkerUnavailableError` is raised
      (TFF itself would retry forever).
    graph_optimization: where Grappler optimizes the TensorFlow graphs
      (`perfed_tff.runtime.compilation`): 'runtime' (in the worker, after placement;
      fastest for convolutional models on CPU), 'tff' (TFF's static pass),
      or 'auto' (for a locally started worker when TensorFlow sees no GPU:
      'runtime' for computations with convolutions, 'tff' for the rest;
      otherwise 'tff'). `self.graph_optimization` is the resolved setting.

  Contexts nest: closing one reinstalls the context of the `ExecutionContext`
  that was current when it was opened (if still open).
  """

  def __init__(
      self,
      workers: Optional[Sequence[str]] = None,
      *,
      max_concurrent_computation_calls: Optional[int] = None,
      default_num_clients: int = 0,
      ready_timeout: float = 60.0,
      retry_timeout: float = 30.0,
      graph_optimization: str = 'auto',
  ):
    compilation.check_graph_optimization(graph_optimization)
    _install_exit_handlers()
    self.context = None
    self.stubs: list[_BoundedRetryStub] = []
    self.aborted: Optional[WorkerUnavailableError] = None
    self.local_workers: list[WorkerProcess] = []
    if not workers:
      if max_concurrent_computation_calls is None:
        # One client computation per core: on the 2-core machine this was
        # 16% faster per round than TFF's default of unlimited (benchmark).
        max_concurrent_computation_calls = os.cpu_count() or -1
      worker = WorkerProcess(
          max_concurrent_computation_calls=max_concurrent_computation_calls
      )
      self.local_workers.append(worker)
      workers = [worker.address]
    self.addresses = list(workers)
    try:
      self.graph_optimization = compilation.resolve_graph_optimization(
          graph_optimization, local_worker=bool(self.local_workers))
      context_kwargs = _context_kwargs(self.graph_optimization,
                                       bool(self.local_workers))
      if len(self.addresses) == 1:
        # A worker started here is waited for at its first computation.
        factory = _executor_factory(
            self.addresses[0], default_num_clients, ready_timeout,
            retry_timeout, self.stubs, wait=not self.local_workers
        )
        self.context = sync_execution_context.SyncExecutionContext(
            factory, **context_kwargs
        )
      else:
        async_contexts = [
            async_execution_context.AsyncExecutionContext(
                _executor_factory(a, default_num_clients, ready_timeout,
                                  retry_timeout, self.stubs),
                **context_kwargs,
            )
            for a in self.addresses
        ]
        self.context = tff.backends.native.create_mergeable_comp_execution_context(
            async_contexts
        )
    except BaseException:
      self.close()
      raise
    tff.framework.set_default_context(self.context)
    _OPEN_CONTEXTS.append(self)

  def _local_worker(self, address: str) -> Optional[WorkerProcess]:
    for worker in self.local_workers:
      if worker.address == address:
        return worker
    return None

  def describe(self, address: str) -> str:
    worker = self._local_worker(address)
    return (f'local TFF worker at {address} (pid {worker.pid})' if worker
            else f'TFF worker at {address}')

  def unhealthy(self, timeout: float) -> list[tuple[str, str]]:
    """(address, why) of every worker that is stopped, gone or does not
    accept a new connection within `timeout` seconds."""
    out = []
    for address in self.addresses:
      worker = self._local_worker(address)
      if worker is not None and not worker.running():
        out.append((address, f'exited with status '
                    f'{worker.process.returncode}'))
      elif worker is not None and worker.frozen():
        out.append((address, 'is stopped (frozen)'))
      elif not probe(address, timeout):
        out.append((address, f'did not answer a health check within '
                    f'{timeout:g}s (frozen, overloaded or unreachable)'))
    return out

  def abort(self, error: WorkerUnavailableError) -> None:
    """Ends the computations in flight with `error` (from any thread): the
    gRPC channels are closed and local workers killed. The context cannot
    be used afterwards."""
    if self.aborted is None:
      self.aborted = error
    for stub in self.stubs:
      stub.abort(error)
    for worker in self.local_workers:
      worker.kill()

  def close(self) -> None:
    """Stops the local workers. The enclosing `ExecutionContext` (if any) is
    reinstalled; otherwise later invocations fail instead of silently
    starting TFF's own (unowned) worker."""
    for worker in self.local_workers:
      worker.stop()
    self.local_workers = []
    if self in _OPEN_CONTEXTS:
      _OPEN_CONTEXTS.remove(self)
    if (self.context is not None
        and context_stack_impl.context_stack.current is self.context):
      if _OPEN_CONTEXTS:
        context_stack_impl.context_stack.set_default_context(
            _OPEN_CONTEXTS[-1].context)
      else:
        context_stack_impl.context_stack.set_default_context(
            runtime_error_context.RuntimeErrorContext()
        )

  def __enter__(self) -> 'ExecutionContext':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def current() -> Optional[ExecutionContext]:
  """The innermost open `ExecutionContext` (None when there is none)."""
  return _OPEN_CONTEXTS[-1] if _OPEN_CONTEXTS else None


def release_tff_default_context() -> None:
  """Replaces TFF's own default context (installed when TFF is imported) by
  one that refuses to run computations, and collects it now. TFF's context
  holds a worker manager whose finalizer fails ("Exception ignored in
  ServiceManager.__del__") when it only runs at interpreter teardown; the
  binaries call this at exit. An open `ExecutionContext` is left alone."""
  import gc  # pylint: disable=g-import-not-at-top
  if _OPEN_CONTEXTS:
    return
  context_stack_impl.context_stack.set_default_context(
      runtime_error_context.RuntimeErrorContext())
  gc.collect()

