"""The gRPC channel from this process to a TFF worker: calls that end in
bounded time with one telling error, health probes, and the executor
factory of TFF's remote executors over it."""

from __future__ import annotations

import copy
import time
from typing import Optional

import grpc
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import executors_errors
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.types import placements

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


class WorkerStub(remote_executor_grpc_stub.RemoteExecutorGrpcStub):
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


def executor_factory(address: str, default_num_clients: int,
                      ready_timeout: float, retry_timeout: float,
                      executor_fn, stubs: Optional[list] = None,
                      wait: bool = True,
                      local_worker=None):
  """A TFF executor factory that talks gRPC to the worker at `address`
  through `executor_fn(stub)` (a `RemoteExecutor`; its stub is appended to
  `stubs` when given). `wait=False` waits for the worker to accept
  connections only when the first computation needs it (a local worker then
  starts while the program traces its computations). `local_worker`: the
  `WorkerProcess` serving `address`, when this process started it (its exit
  is then reported at once)."""
  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  stub = WorkerStub(channel, address, retry_timeout,
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
    executor = executor_fn(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return python_executor_stacks.ResourceManagingExecutorFactory(stack_fn)
