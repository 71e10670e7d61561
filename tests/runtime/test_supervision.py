"""Run supervision (`perfed_tff/runtime/supervision.py`): the watchdog's
health checks and deadlines, a signal ending the calls in flight, the typed
errors a run leaves with."""

import os
import time

import pytest
import tensorflow_federated as tff

from perfed_tff.program import outputs
from perfed_tff.program import training_loop as tp
from perfed_tff.runtime import supervision
from perfed_tff.runtime import worker_errors
from tests import tff_helpers as h


class _FakeContext:

  def __init__(self, bad=()):
    self.bad = list(bad)
    self.aborted = None
    self.local_workers = []

  def unhealthy(self, timeout):
    del timeout
    return self.bad

  def describe(self, address):
    return f'TFF worker at {address}'

  def abort(self, error):
    self.aborted = error


def _run_phase_until_failure(dog, label, failure, timeout=10.0):
  """Runs the round phase `label` under `dog` until `failure()` is set (or
  `timeout` s), then stops the watchdog."""
  try:
    dog.begin(label, 'round')
    deadline = time.monotonic() + timeout
    while failure() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    dog.end()
  finally:
    dog.stop()


def test_watchdog_fails_a_phase_on_an_unhealthy_worker():
  context = _FakeContext([('h:1', 'did not answer a health check within 5s')])
  lines = []
  dog = supervision.Watchdog(round_timeout=0, health_timeout=5, write=lines.append,
                     context=context)
  _run_phase_until_failure(dog, 'round 4', lambda: context.aborted)
  assert isinstance(context.aborted, worker_errors.WorkerUnavailableError)
  assert str(context.aborted) == (
      'TFF worker at h:1 did not answer a health check within 5s during '
      'round 4; stopped the run.')
  assert dog.error is context.aborted


def test_watchdog_deadlines():
  dog = supervision.Watchdog(round_timeout=0, health_timeout=5, write=print)
  try:
    assert dog.deadline('initialization') == supervision.FIRST_ROUND_TIMEOUT
    assert dog.deadline('round') == supervision.FIRST_ROUND_TIMEOUT
    dog._seconds['round'] = [30.0, 0.1, 0.2, 10.0]  # First: compilation.
    assert dog.deadline('round') == 60.0  # max(60, 20 x median 0.2)
    dog._seconds['round'] = [30.0, 5.0, 5.0]
    assert dog.deadline('round') == 100.0
    assert dog.deadline('evaluation') == supervision.MIN_EVAL_TIMEOUT
  finally:
    dog.stop()
  explicit = supervision.Watchdog(round_timeout=1.0, health_timeout=5, write=print,
                          context=_FakeContext())
  explicit._seconds['round'] = [9.0]
  _run_phase_until_failure(explicit, 'round 2', lambda: explicit.error)
  assert isinstance(explicit.error, worker_errors.RoundTimeoutError)
  assert 'round 2 did not finish within its 1s deadline' in str(
      explicit.error)


def test_full_disk_during_a_checkpoint_write_is_enospc_naming_the_file(
    tmp_path, small_task, monkeypatch):
  """TensorFlow reports a full disk as `ResourceExhaustedError: ...; No space
  left on device`; the run raises `OSError(ENOSPC)` naming the file (the
  binaries print `the disk is full (PATH)`), removes the partial save and
  keeps the checkpoints before it."""
  import errno  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  real_save = tff.program.FileProgramStateManager.save
  target = {}

  async def full_disk_save(self, state, version):
    if version == 2:
      temp = os.path.join(self._root_dir, 'program_state_2_temp1')
      os.makedirs(temp)
      target['path'] = os.path.join(temp, 'variables', 'variables.index')
      raise tf.errors.ResourceExhaustedError(
          None, None, f'{target["path"]}; No space left on device '
          '[Op:SaveV2]')
    await real_save(self, state, version)

  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save',
                      full_disk_save)
  config = h.training_config(tmp_path, **h.FAULTS_RUN)
  with pytest.raises(OSError) as e:
    tp.run_training(config, task=small_task, process=h.StubProcess())
  assert e.value.errno == errno.ENOSPC
  assert e.value.filename == target['path']
  ckpts = outputs.output_paths(config)['checkpoints']
  assert sorted(os.listdir(ckpts)) == ['program_state_0', 'program_state_1']
  # Not a full disk: TensorFlow's out-of-memory error stays as it is.
  oom = tf.errors.ResourceExhaustedError(None, None, 'OOM when allocating')
  assert supervision.disk_full_error(oom) is None


def test_a_worker_failure_is_named_with_the_phase_it_stopped(tmp_path):
  """A dead local worker reported by the execution context (not the
  watchdog) reads as the watchdog says it: worker, what happened, phase."""
  error = worker_errors.WorkerUnavailableError(
      'local TFF worker at localhost:1 (pid 7) exited with status -9; '
      'stopped the run.')
  error.worker_failure = ('local TFF worker at localhost:1 (pid 7)',
                          'exited with status -9')
  with pytest.raises(worker_errors.WorkerUnavailableError) as e:
    with supervision.Supervisor(round_timeout=0, health_timeout=5,
                                write=print, run_dir=str(tmp_path)) as s:
      s.begin('round 4', 'round')
      raise error
  # (Then the logs of the context's local workers, if any, are named.)
  assert str(e.value).startswith(
      'local TFF worker at localhost:1 (pid 7) exited with status -9 during '
      'round 4; stopped the run.'), str(e.value)
