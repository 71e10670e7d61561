"""TFF execution contexts whose C++ worker processes this library owns.

TFF's `tff.backends.native.create_sync_local_cpp_execution_context()` starts a
`worker_binary` child that inherits the parent's stdout/stderr and is killed
only when its Python manager is garbage collected. Such a child can outlive the
interpreter and keep a pipe open, so `pytest | tee log` (or a CI runner) waits
forever. Here the worker is a
`perfed_tff.runtime.local_worker.WorkerProcess` (its output in a log file,
stopped with its parent, at exit, on signals and when the `ExecutionContext`
that started it is closed), and the context talks gRPC to it with bounded
retries and health checks.

The same `worker_binary` served on other hosts is TFF's multi-machine engine:
`ExecutionContext(workers=['host:port', ...])` connects to such workers and
spreads every round's clients over them with
`tff.backends.native.create_mergeable_comp_execution_context`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Optional, Sequence

import grpc
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import executors_errors
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.types import placements
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

from perfed_tff.runtime import compilation
from perfed_tff.runtime import computation_keeping
from perfed_tff.runtime import local_worker
from perfed_tff.runtime.local_worker import WorkerProcess
from perfed_tff.runtime.local_worker import install_exit_handlers
from perfed_tff.runtime.local_worker import stop_all_workers
from perfed_tff.runtime.worker_errors import computation_error
from perfed_tff.runtime.worker_errors import WorkerUnavailableError

_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_BYTES),
]


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
    check = getattr(stub, 'check_process', None)
    if check is not None:
      check()  # A local worker that exited never becomes ready.
    if time.monotonic() > deadline:
      error = WorkerUnavailableError(
          f'TFF worker at {address} did not become ready within '
          f'{timeout:.0f}s; is `python -m perfed_tff.runtime.worker --port=PORT` '
          'running there?'
      )
      error.unready_address = address  # No computation ever reached it.
      error.ready_timeout = timeout
      raise error
    time.sleep(0.05)


_STUB_METHODS = ('get_executor', 'create_value', 'create_struct',
                 'create_call', 'create_selection', 'compute')
_RELEASE_METHODS = ('dispose', 'dispose_executor')


class _BoundedRetryStub(remote_executor_grpc_stub.RemoteExecutorGrpcStub):
  """A gRPC stub whose connection failures end in a clear error.

  TFF's async context retries a `RetryableError` (gRPC UNAVAILABLE, ...)
  forever. Here a retryable failure first waits up to `retry_timeout` seconds
  for the worker's channel to become ready again: if it does, the error is
  re-raised for TFF to retry (at most `max_retries` times in a row); if not,
  `WorkerUnavailableError` (not retryable) names the worker. The wait ends
  at once when the worker is known to be gone: `local_worker` (the
  `WorkerProcess` behind `address`, if this process started it) exited, or
  the stub was aborted (`abort`, e.g. by the watchdog). A computation that
  fails inside the worker raises `WorkerComputationError` (one telling line).
  """

  _POLL_SECONDS = 0.25  # How often a retry's wait checks for a dead worker.

  def __init__(self, channel, address: str, retry_timeout: float,
               max_retries: int = 3, local_worker=None):
    super().__init__(channel)
    self._address = address
    self._retry_timeout = retry_timeout
    self._max_retries = max_retries
    self._local_worker = local_worker
    self._failures = 0
    self._dead: Optional[WorkerUnavailableError] = None
    for name in _STUB_METHODS:
      setattr(self, name, self._bounded(getattr(self, name)))
    for name in _RELEASE_METHODS:
      setattr(self, name, self._forgiving(getattr(self, name)))

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

  def _dead_error(self) -> WorkerUnavailableError:
    """A fresh copy of the error every call fails with (attributes kept)."""
    return copy.copy(self._dead)

  def check_process(self) -> None:
    """Raises `WorkerUnavailableError` when the local worker behind this
    stub has exited (a dead process never answers again: no wait)."""
    worker = self._local_worker
    status = None if worker is None else worker.process.poll()
    if status is None:
      return
    if self._dead is None:
      who = f'local TFF worker at {self._address} (pid {worker.pid})'
      why = f'exited with status {status}'
      error = WorkerUnavailableError(f'{who} {why}; stopped the run.')
      error.worker_failure = (who, why)
      self._dead = error
    raise self._dead_error()

  def _bounded(self, method):
    def call(request):
      if self._dead is not None:  # Calls in flight fail at once, not in turn.
        raise self._dead_error()
      try:
        response = method(request)
      except executors_errors.RetryableError as e:
        if self._dead is not None:
          raise self._dead_error() from None
        self._on_retryable(e)
        raise
      except Exception as e:  # pylint: disable=broad-except
        if self._dead is not None:  # Cancelled by `abort`.
          raise self._dead_error() from None
        failed = computation_error(e, self._address)
        if failed is not None:
          raise failed from None
        raise
      self._failures = 0
      return response
    return call

  def _forgiving(self, method):
    """A call that only frees values on the worker (TFF's finalizers of
    remote values call it, also at interpreter exit): when the worker is
    gone there is nothing left to free, so it returns at once instead of
    waiting for the worker and raising from a finalizer (a traceback after
    the one-line error of a stopped run)."""
    def call(request):
      if self._dead is not None:
        return None
      try:
        return method(request)
      except (executors_errors.RetryableError, WorkerUnavailableError,
              grpc.RpcError):
        return None
    return call

  def _on_retryable(self, error) -> None:
    self.check_process()
    self._failures += 1
    if self._failures > self._max_retries:
      self._dead = WorkerUnavailableError(
          f'TFF worker at {self._address} failed {self._failures} times in a '
          'row with a retryable gRPC error; giving up.')
      raise self._dead from error
    # Wait for the channel in short slices: a worker known to be dead (its
    # process exited, or the watchdog aborted this stub) ends the wait.
    ready = grpc.channel_ready_future(self._channel)
    deadline = time.monotonic() + self._retry_timeout
    try:
      while True:
        if self._dead is not None:
          raise self._dead_error() from None
        self.check_process()
        left = deadline - time.monotonic()
        if left <= 0:
          break
        try:
          ready.result(timeout=min(self._POLL_SECONDS, left))
          return
        except grpc.FutureTimeoutError:
          continue
    finally:
      ready.cancel()
    self._dead = WorkerUnavailableError(
        f'TFF worker at {self._address} is unreachable and did not come '
        f'back within {self._retry_timeout:g}s (was it stopped or killed?).')
    raise self._dead from None


def _executor_factory(address: str, default_num_clients: int,
                      ready_timeout: float, retry_timeout: float,
                      stubs: Optional[list] = None, wait: bool = True,
                      local_worker: Optional[WorkerProcess] = None):
  """A TFF executor factory that talks gRPC to the worker at `address`
  (its stub is appended to `stubs` when given). `wait=False` waits for the
  worker to accept connections only when the first computation needs it
  (a local worker then starts while the program traces its computations).
  `local_worker`: the `WorkerProcess` serving `address`, when this process
  started it (its exit is then reported at once)."""
  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  stub = _BoundedRetryStub(channel, address, retry_timeout,
                           local_worker=local_worker)
  if stubs is not None:
    stubs.append(stub)
  ready = []
  if wait:
    wait_until_ready(stub, address, ready_timeout)
    ready.append(True)

  def stack_fn(cardinalities):
    if not ready:
      wait_until_ready(stub, address, ready_timeout)
      if local_worker is not None:  # Loopback only, or killed and refused.
        local_worker.check_confined()
      ready.append(True)
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    executor = computation_keeping.ComputationKeepingExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return python_executor_stacks.ResourceManagingExecutorFactory(stack_fn)


def _context_kwargs(graph_optimization: str, local_worker: bool):
  return dict(
      compiler_fn=compilation.compiler_fn(graph_optimization,
                                          local_worker=local_worker),
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
      cardinality_inference_fn=computation_keeping.infer_cardinalities,
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
    install_exit_handlers()
    self.context = None
    self._pipeline: Optional[computation_keeping.CompilerPipeline] = None
    self.stubs: list[_BoundedRetryStub] = []
    self.aborted: Optional[WorkerUnavailableError] = None
    self.local_workers: list[WorkerProcess] = []
    if not workers:
      if max_concurrent_computation_calls is None:
        # One client computation per core: on the 2-core machine this was
        # 16% faster per round than TFF's default of unlimited (benchmark).
        max_concurrent_computation_calls = os.cpu_count() or -1
      worker = (local_worker.adopt_early(max_concurrent_computation_calls)
                or WorkerProcess(max_concurrent_computation_calls=(
                    max_concurrent_computation_calls)))
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
            retry_timeout, self.stubs, wait=not self.local_workers,
            local_worker=self._local_worker(self.addresses[0])
        )
        self.context = sync_execution_context.SyncExecutionContext(
            factory, **context_kwargs
        )
        self._pipeline = computation_keeping.keep_compiled(
            self.context, self.graph_optimization)
      else:
        async_contexts = [
            async_execution_context.AsyncExecutionContext(
                _executor_factory(a, default_num_clients, ready_timeout,
                                  retry_timeout, self.stubs),
                **context_kwargs,
            )
            for a in self.addresses
        ]
        for async_context in async_contexts:
          computation_keeping.keep_compiled(async_context,
                                            self.graph_optimization)
        self.context = tff.backends.native.create_mergeable_comp_execution_context(
            async_contexts
        )
    except BaseException:
      self.close()
      raise
    tff.framework.set_default_context(self.context)
    _OPEN_CONTEXTS.append(self)

  @property
  def single_worker(self) -> bool:
    """Whether computations run whole on one worker (not split across
    several by the mergeable context)."""
    return self._pipeline is not None

  def compile(self, comp: computation_impl.ConcreteComputation
              ) -> computation_impl.ConcreteComputation:
    """`comp` in the form this context sends its worker (compiled once and
    kept; a single-worker context only)."""
    if self._pipeline is None:
      raise ValueError('a multi-worker context compiles per invocation')
    return self._pipeline.compile(comp)

  def add_compiled(self, comp: computation_impl.ConcreteComputation) -> None:
    """Runs `comp`, built from computations of `compile`, as it is."""
    if self._pipeline is None:
      raise ValueError('a multi-worker context compiles per invocation')
    self._pipeline.add_compiled(comp)

  def is_current(self) -> bool:
    """Whether TFF's computations run in this context now."""
    return (self.context is not None and
            context_stack_impl.context_stack.current is self.context)

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

  @contextlib.contextmanager
  def activated(self):
    """Runs TFF's computations of the block in this context (another open
    one may be current around it), then restores the one that was current."""
    previous = context_stack_impl.context_stack.current
    context_stack_impl.context_stack.set_default_context(self.context)
    try:
      yield self
    finally:
      context_stack_impl.context_stack.set_default_context(previous)

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

