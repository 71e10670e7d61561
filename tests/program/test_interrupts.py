"""Interrupts of a run (`perfed_tff/program/interrupts.py`): SIGINT, SIGTERM
and SIGHUP deferred to the end of a critical section (also during a
checkpoint write, under TFF's own context), a stop hook taking the signal,
a quiet exit during start-up."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff.program import interrupts
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import outputs
from perfed_tff.program import training_loop as tp
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
def test_a_stop_hook_takes_the_signal_instead_of_an_exception():
  """While a hook is registered (the owned runtime's supervisor ends the
  calls in flight with it), a signal calls it and raises nothing; the
  signal is still the one received."""
  interrupts.install_interrupt_handlers()
  called = []
  with interrupts.stop_hook(called.append):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
  assert called == [signal.SIGTERM]
  assert interrupts.interrupt_received() == signal.SIGTERM


def test_a_signal_during_start_up_exits_quietly_in_one_line(tmp_path):
  """Before the program starts its work (imports, flag parsing), a signal
  prints one line and exits with 128 + its number: nothing was written."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  script = (
      'import os, signal, sys, time\n'
      f'sys.path.insert(0, {root!r})\n'
      'from perfed_tff.program import interrupts\n'
      'interrupts.install_interrupt_handlers(starting=True)\n'
      'os.kill(os.getpid(), signal.SIGTERM)\n'
      'time.sleep(5)\n')
  done = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=60,
                        preexec_fn=lambda: signal.signal(signal.SIGTERM,
                                                         signal.SIG_DFL))
  assert done.returncode == 143
  assert done.stderr == ('-c: error: SIGTERM during start-up; nothing was '
                         'written.\n'), done.stderr


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
  phase = getattr(e.value, 'phase', None)
  assert phase is None or 'checkpoint 2' in phase
  ckpts = outputs.output_paths(config)['checkpoints']
  assert sorted(os.listdir(ckpts)) == ['program_state_0', 'program_state_1',
                                       'program_state_2']
  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save', real_save)
  result = tp.run_training(config, task=small_task, process=h.StubProcess())
  assert result.resumed_from == 2
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 4.0))


