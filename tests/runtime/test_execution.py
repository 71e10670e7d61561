"""`perfed_tff.runtime.execution`: nested contexts and the one restored on
close, two-worker mergeable execution, a bounded wait (clear error) when a
worker dies, a computation that fails on the worker as one typed line."""

import time

import numpy as np
import pytest
import tensorflow_federated as tff

import perfed_tff
from perfed_tff.runtime import execution
from perfed_tff.runtime import worker_channel
from perfed_tff.runtime import worker_errors
from tests import tff_helpers as h

STACK = tff.framework.get_context_stack()


@tff.tensorflow.computation(np.float32)
def _double(x):
  return x * 2.0


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def _sum_doubles(xs):
  return tff.federated_sum(tff.federated_map(_double, xs))


def test_nested_context_restores_the_outer_one(tff_context):
  outer = STACK.current
  assert outer is tff_context.context
  with execution.ExecutionContext() as inner:
    assert STACK.current is inner.context
    assert _sum_doubles([1.0, 2.0]) == pytest.approx(6.0)
  assert STACK.current is outer
  assert _sum_doubles([1.0]) == pytest.approx(2.0)


def test_closing_restores_the_context_it_replaced(tff_context):
  """Closing reinstalls the context that was current when it was opened
  (TFF's own default included); an enclosing one closed meanwhile is
  passed over for the context that one had replaced."""
  base = STACK.current
  first = execution.ExecutionContext()
  second = execution.ExecutionContext()
  assert STACK.current is second.context
  first.close()          # Not current: nothing changes.
  assert STACK.current is second.context
  second.close()         # `first` is closed: back to what it replaced.
  assert STACK.current is base is tff_context.context


def test_two_workers_split_clients_and_dead_worker_fails_fast():
  workers = [execution.WorkerProcess() for _ in range(2)]
  try:
    with execution.ExecutionContext(workers=[w.address for w in workers],
                                    retry_timeout=2.0):
      values = [float(i) for i in range(7)]
      assert _sum_doubles(values) == pytest.approx(2 * sum(values))
      workers[1].process.kill()
      workers[1].process.wait()
      t0 = time.monotonic()
      with pytest.raises(worker_errors.WorkerUnavailableError,
                         match=f'TFF worker at {workers[1].address} is '
                         'unreachable and did not come back within 2s'):
        _sum_doubles(values)
      assert time.monotonic() - t0 < 30
  finally:
    for w in workers:
      w.stop()


def test_unreachable_worker_at_start_is_a_clear_error():
  with pytest.raises(worker_errors.WorkerUnavailableError,
                     match='did not become ready within 1s'):
    execution.ExecutionContext(workers=['localhost:1'], ready_timeout=1.0)


def test_freeing_values_on_a_gone_worker_returns_at_once():
  """TFF's remote-value finalizers (also at interpreter exit, after a run
  stopped its worker) call `dispose`: with the worker gone it must neither
  wait for it nor raise (a traceback after the run's one-line error)."""
  import grpc  # pylint: disable=g-import-not-at-top
  import portpicker  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.proto.v0 import executor_pb2  # pylint: disable=g-import-not-at-top
  address = f'localhost:{portpicker.pick_unused_port()}'  # Nobody listens.
  stub = worker_channel.WorkerStub(
      grpc.insecure_channel(address), address, retry_timeout=30.0)
  start = time.monotonic()
  assert stub.dispose(executor_pb2.DisposeRequest()) is None
  assert stub.dispose_executor(executor_pb2.DisposeExecutorRequest()) is None
  assert time.monotonic() - start < 10.0
  stub.abort(worker_errors.WorkerUnavailableError('stopped'))
  assert stub.dispose(executor_pb2.DisposeRequest()) is None
  with pytest.raises(worker_errors.WorkerUnavailableError):
    stub.compute(executor_pb2.ComputeRequest())


def test_killed_local_worker_is_reported_at_once():
  """A local worker whose process exited is known dead: the call fails at
  once naming its exit status, without waiting `retry_timeout` for it."""
  with execution.ExecutionContext(retry_timeout=120.0) as context:
    assert _sum_doubles([1.0]) == pytest.approx(2.0)
    worker = context.local_workers[0]
    worker.process.kill()
    worker.process.wait()
    t0 = time.monotonic()
    with pytest.raises(worker_errors.WorkerUnavailableError,
                       match=rf'^local TFF worker at {worker.address} \(pid '
                       rf'{worker.pid}\) exited with status -9; stopped the '
                       'run.$') as e:
      _sum_doubles([1.0, 2.0])
    waited = time.monotonic() - t0
    assert e.value.worker_failure == (
        f'local TFF worker at {worker.address} (pid {worker.pid})',
        'exited with status -9')
    assert waited < 60, waited  # Not the 120 s retry wait.


def test_failed_computation_is_a_typed_error_with_the_telling_line():
  details = ('Failed to run computation: Received a label value of 12 which '
             'is outside the valid range of [0, 10).  Label values: 12 12\n'
             '\t [[{{function_node __inference_update_state_419}}]] while '
             'evaluating local [_wvh27] in block locals [_wvh3]')
  assert worker_errors.telling_line(details) == (
      'Received a label value of 12 which is outside the valid range of '
      '[0, 10).  Label values: 12 12')
  assert worker_errors.telling_line('') == 'the computation failed on the worker'


def test_label_outside_the_model_range_is_a_typed_one_line_error():
  """In the owned context (TFF's own gives a gRPC error of many lines)."""
  x, _ = h.random_client(5, 8)
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant='fo', alpha=0.1, beta=0.1, local_steps=1)
  with pytest.raises(ValueError) as e:
    process.next(process.initialize(),
                 [h.dataset(x, np.full(8, 12, np.int32), 4)])
  assert isinstance(e.value, worker_errors.WorkerComputationError)
  assert str(e.value).startswith(
      f'Received a label value of 12 which is outside the valid range of '
      f'[0, {h.CLASSES}).'), str(e.value)
  assert '\n' not in str(e.value)
  assert 'while evaluating local' in e.value.details
