"""Run supervision (`perfed_tff/runtime/supervision.py`): interrupts deferred
to the end of a critical section (also during a checkpoint write), the
watchdog's health checks and deadlines."""

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import training_loop as tp
from perfed_tff.runtime import interrupts
from perfed_tff.runtime import supervision
from perfed_tff.runtime import worker_errors
from tests import tff_helpers as h


@pytest.fixture
def signals_not_ignored():
  """The interrupt signals at their default disposition, as a terminal
  gives them (a launcher such as nohup ignores SIGHUP, and an ignored
  signal stays ignored); restored afterwards."""
  previous = {s: signal.getsignal(s) for s in interrupts.INTERRUPT_SIGNALS}
  for s in interrupts.INTERRUPT_SIGNALS:
    signal.signal(s, signal.SIG_DFL if s != signal.SIGINT
                  else signal.default_int_handler)
  yield
  for s, handler in previous.items():
    signal.signal(s, handler)
  interrupts.clear_interrupt()


@pytest.mark.usefixtures('signals_not_ignored')
def test_interrupt_is_deferred_to_the_end_of_a_critical_section():
  interrupts.install_interrupt_handlers()
  done = []
  with pytest.raises(interrupts.Interrupted) as e:
    with interrupts.critical_section():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)  # The handler has run: deferred.
      done.append(True)
  assert done == [True]
  assert e.value.signum == signal.SIGTERM and e.value.exit_status == 143
  with pytest.raises(interrupts.Interrupted) as e:
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(1)
  assert e.value.exit_status == 129


@pytest.mark.usefixtures('signals_not_ignored')
def test_a_collection_in_another_thread_does_not_hold_off_interrupts():
  """A garbage collection defers a signal only in the main thread (where
  Python would swallow the exception); one that lasts in another thread (a
  finalizer waiting on a lock) does not hold the signal off meanwhile."""
  inside, release = threading.Event(), threading.Event()

  class Waits:
    def __del__(self):
      inside.set()
      release.wait(10)

  def collect():
    cycle = Waits()
    cycle.self = cycle
    del cycle
    gc.collect()

  collector = threading.Thread(target=collect, daemon=True)
  try:
    interrupts.install_interrupt_handlers()
    collector.start()
    assert inside.wait(10)
    with pytest.raises(interrupts.Interrupted) as e:
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(2)
    assert e.value.exit_status == 129
  finally:
    release.set()
    collector.join(10)


def test_sigint_during_a_checkpoint_write_completes_it(tmp_path, small_task,
                                                       monkeypatch):
  """The signal arrives mid-save: the save finishes, then the run stops;
  the rerun resumes from that checkpoint."""
  real_save = tff.program.FileProgramStateManager.save

  async def slow_save(self, state, version):
    if version == 2:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
    await real_save(self, state, version)

  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save', slow_save)
  previous = {s: signal.getsignal(s) for s in interrupts.INTERRUPT_SIGNALS}
  config = h.training_config(tmp_path, **h.FAULTS_RUN)
  try:
    interrupts.install_interrupt_handlers()
    with pytest.raises(interrupts.Interrupted) as e:
      tp.run_training(config, task=small_task, process=h.StubProcess())
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    interrupts.clear_interrupt()
  assert e.value.phase is None or 'checkpoint 2' in e.value.phase
  ckpts = tp.output_paths(config)['checkpoints']
  assert sorted(os.listdir(ckpts)) == ['program_state_0', 'program_state_1',
                                       'program_state_2']
  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save', real_save)
  result = tp.run_training(config, task=small_task, process=h.StubProcess())
  assert result.resumed_from == 2
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 4.0))


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
  ckpts = tp.output_paths(config)['checkpoints']
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
