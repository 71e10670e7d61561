"""`perfed_tff.runtime.execution`: nested contexts, two-worker mergeable execution,
and a bounded wait (clear error) when a worker dies."""

import os
import time

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff.runtime import execution
from perfed_tff.runtime import worker_errors
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl


@tff.tensorflow.computation(np.float32)
def _double(x):
  return x * 2.0


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def _sum_doubles(xs):
  return tff.federated_sum(tff.federated_map(_double, xs))


def test_nested_context_restores_the_outer_one(tff_context):
  outer = context_stack_impl.context_stack.current
  assert outer is tff_context.context
  with execution.ExecutionContext() as inner:
    assert context_stack_impl.context_stack.current is inner.context
    assert _sum_doubles([1.0, 2.0]) == pytest.approx(6.0)
  assert context_stack_impl.context_stack.current is outer
  assert _sum_doubles([1.0]) == pytest.approx(2.0)


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
  stub = execution._BoundedRetryStub(  # pylint: disable=protected-access
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


def _worker_pids():
  import psutil  # pylint: disable=g-import-not-at-top
  return {p.pid for p in psutil.Process().children(recursive=True)
          if 'worker_binary' in ' '.join(p.cmdline() or [])}


def test_a_worker_started_early_is_adopted_by_the_next_context():
  from perfed_tff.runtime import local_worker  # pylint: disable=g-import-not-at-top
  before = _worker_pids()
  local_worker.start_early(2)
  (early,) = _worker_pids() - before
  with execution.ExecutionContext(max_concurrent_computation_calls=2) as ctx:
    assert ctx.local_workers[0].pid == early
    assert _sum_doubles([1.0, 2.0]) == pytest.approx(6.0)
  assert early not in _worker_pids()
  # Started with other settings: stopped, and the context starts its own.
  local_worker.start_early(2)
  (early,) = _worker_pids() - before
  with execution.ExecutionContext(max_concurrent_computation_calls=1) as ctx:
    assert ctx.local_workers[0].pid != early
    assert early not in _worker_pids()
  assert local_worker.adopt_early(2) is None


def test_binaries_start_no_early_worker_for_remote_workers_or_help():
  from experiments import startup  # pylint: disable=g-import-not-at-top
  from perfed_tff.runtime import local_worker  # pylint: disable=g-import-not-at-top
  before = _worker_pids()
  for argv in (['train', '--workers=localhost:1'],
               ['train', '--workers', 'localhost:1'], ['train', '--helpfull'],
               ['train', '-h']):
    startup.start_local_worker_early(argv)
    assert _worker_pids() == before, argv
  startup.start_local_worker_early(['train', '--workers=', '--rounds=3'])
  worker = local_worker.adopt_early(os.cpu_count() or -1)
  assert worker is not None and worker.running()
  worker.stop()
  assert _worker_pids() == before
