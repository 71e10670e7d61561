"""No `worker_binary` outlives the Python process that started it, whatever
way that process ends, and a pipe on its output is never held open."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from perfed_tff.runtime import local_worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Opens an ExecutionContext without closing it (the one line a library user
# writes), prints its worker's pid, then ends as `MODE` says.
SCRIPT = textwrap.dedent('''
    import os, sys, time, psutil
    import tensorflow as tf, tensorflow_federated as tff
    from perfed_tff import runtime
    runtime.ExecutionContext()
    @tff.tensorflow.computation(tf.float32)
    def add_one(x):
      return x + 1
    assert add_one(1.0) == 2.0
    workers = [p.pid for p in psutil.Process().children()
               if 'worker_binary' in ' '.join(p.cmdline())]
    print('WORKERS', *workers, flush=True)
    mode = sys.argv[1]
    if mode == 'raise':
      raise RuntimeError('boom')
    if mode == 'wait':
      time.sleep(600)
''')


def _start(mode):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  # stdout/stderr are pipes: a worker inheriting them would keep
  # communicate() from ever returning.
  return subprocess.Popen([sys.executable, '-c', SCRIPT, mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _worker_pids(line):
  assert line.startswith('WORKERS'), line
  pids = [int(p) for p in line.split()[1:]]
  assert len(pids) == 1
  return pids


def _gone(pids, timeout=20.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    alive = [p for p in pids if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    if not alive:
      return True
    time.sleep(0.2)
  return False


@pytest.mark.parametrize('mode', ['exit', 'raise'])
def test_worker_stops_when_python_exits_or_raises(mode):
  proc = _start(mode)
  out, err = proc.communicate(timeout=240)   # would hang if a pipe were held
  assert proc.returncode == (0 if mode == 'exit' else 1), err[-2000:]
  assert _gone(_worker_pids(out.splitlines()[0]))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_worker_stops_when_python_is_signalled(sig):
  proc = _start('wait')
  line = proc.stdout.readline()
  pids = _worker_pids(line)
  assert all(psutil.pid_exists(p) for p in pids)
  proc.send_signal(sig)
  proc.communicate(timeout=120)
  assert _gone(pids), f'worker survived {sig!r}'


IMPORT_SCRIPT = textwrap.dedent('''
    import psutil
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
    before = context_stack_impl.context_stack.current
    import perfed_tff
    from perfed_tff import algorithms, personalization_eval
    from perfed_tff.program import training_loop
    from perfed_tff.runtime import execution
    from perfed_tff.models import linear
    process = perfed_tff.build_per_fedavg(
        linear.softmax_regression_model_fn(4, 3, 0), variant='hf',
        alpha=0.1, beta=0.1, local_steps=1)
    fedavg = algorithms.build_algorithm(
        'fedavg', linear.softmax_regression_model_fn(4, 3, 0), alpha=0.1,
        beta=0.1, local_steps=1)
    assert context_stack_impl.context_stack.current is before, 'context replaced'
    workers = [p for p in psutil.Process().children(recursive=True)
               if 'worker_binary' in ' '.join(p.cmdline())]
    assert not workers, workers
    print('UNTOUCHED')
''')


def test_import_and_build_start_no_worker_and_keep_tffs_context():
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  r = subprocess.run([sys.executable, '-c', IMPORT_SCRIPT], env=env,
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 0 and 'UNTOUCHED' in r.stdout, r.stderr[-3000:]


def test_logs_of_trainers_killed_by_sigkill_are_removed_by_the_next_start(
    tmp_path):
  # Found by experiments/chaos_soak.py: a trainer killed by SIGKILL cannot
  # delete its worker's temporary log, so they piled up in the temp folder.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  names = [f'tff_worker_{dead.pid}_abc.log', f'tff_worker_{os.getpid()}_x.log',
           'tff_worker_abc.log', 'other.log']
  for name in names:
    (tmp_path / name).write_text('log')
  removed = local_worker.remove_stale_logs(str(tmp_path))
  assert removed == [str(tmp_path / names[0])]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
