"""Faults of `experiments/train.py` (subprocess, end to end): kill -9 and
resume, two workers on loopback, a worker killed mid-run, SIGTERM."""

import signal
import subprocess
import sys
import time

import portpicker
import pytest

from tests import binary_helpers as h

pytestmark = pytest.mark.slow
ROUNDS = '--rounds=12'


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
  """Final weights of an uninterrupted single-process run."""
  out = tmp_path_factory.mktemp('baseline')
  r = h.run(ROUNDS, f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  return h.final_weights(out / 'per_fedavg_fo')


def _start_worker(port, log_path):
  return subprocess.Popen(
      [sys.executable, '-m', 'perfed_tff.runtime.worker', f'--port={port}'],
      env=h.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
      stderr=open(log_path, 'ab'))


@pytest.fixture
def two_workers(tmp_path):
  ports = [portpicker.pick_unused_port() for _ in range(2)]
  procs = {p: _start_worker(p, tmp_path / f'worker_{p}.log') for p in ports}

  def restart(port):
    procs[port] = _start_worker(port, tmp_path / f'worker_{port}.log')

  yield ports, procs, restart
  for proc in procs.values():
    proc.kill()
    proc.wait()


def test_kill9_at_several_rounds_resumes_exactly(tmp_path, baseline):
  out = tmp_path / 'out'
  csv_path = out / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  killed_at = []
  for target in (3, 8):  # checkpoint_every=2: round 3 is redone on resume.
    proc = h.start(ROUNDS, f'--root_output_dir={out}',
                   log_path=tmp_path / 'log.txt')
    h.wait_for_round(proc, csv_path, target)
    workers = h.worker_descendants(proc.pid)
    h.kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at.append(max(h.csv_rounds(csv_path)))
    assert not h.wait_gone(workers), 'worker_binary outlived kill -9'
  assert killed_at[0] < killed_at[1] < 12
  r = h.run(ROUNDS, f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from round' in r.stdout
  assert h.csv_rounds(csv_path) == list(range(1, 13))
  h.assert_weights_close(h.final_weights(out / 'per_fedavg_fo'), baseline,
                         atol=1e-6)


def test_two_local_workers_match_single_process(tmp_path, baseline,
                                                two_workers):
  ports, _, _ = two_workers
  workers = '--workers=' + ','.join(f'localhost:{p}' for p in ports)
  r = h.run(ROUNDS, f'--root_output_dir={tmp_path}', workers)
  assert r.returncode == 0, r.stderr[-3000:]
  h.assert_weights_close(h.final_weights(tmp_path / 'per_fedavg_fo'),
                         baseline, atol=1e-5)


def test_killed_worker_gives_clear_error_then_resume(tmp_path, baseline,
                                                     two_workers):
  ports, procs, restart = two_workers
  workers = '--workers=' + ','.join(f'localhost:{p}' for p in ports)
  csv_path = tmp_path / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  log = tmp_path / 'run.log'
  proc = h.start(ROUNDS, f'--root_output_dir={tmp_path}', workers,
                 log_path=log)
  h.wait_for_round(proc, csv_path, 3)
  procs[ports[1]].kill()
  procs[ports[1]].wait()
  t0 = time.monotonic()
  proc.wait(timeout=120)
  waited = time.monotonic() - t0
  text = log.read_text()
  assert proc.returncode == 1, text[-3000:]
  assert (f'TFF worker at localhost:{ports[1]} is unreachable and did not '
          'come back within 5s') in text
  assert 'Rerun the same command to resume' in text
  print(f'worker death reported after {waited:.1f}s')
  assert waited < 60
  restart(ports[1])
  r = h.run(ROUNDS, f'--root_output_dir={tmp_path}', workers)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from round' in r.stdout
  assert h.csv_rounds(csv_path) == list(range(1, 13))
  h.assert_weights_close(h.final_weights(tmp_path / 'per_fedavg_fo'),
                         baseline, atol=1e-5)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_no_worker_binary(tmp_path, signum):
  csv_path = tmp_path / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  proc = h.start('--rounds=100000', f'--root_output_dir={tmp_path}',
                 log_path=tmp_path / 'log.txt')
  h.wait_for_round(proc, csv_path, 2)
  workers = h.worker_descendants(proc.pid)
  assert workers, 'expected the binary to own a worker_binary'
  proc.send_signal(signum)
  proc.wait(timeout=60)
  if signum == signal.SIGTERM:
    assert proc.returncode == -signal.SIGTERM
  else:
    assert proc.returncode == 130
    assert 'interrupted; rerun the same command' in (
        tmp_path / 'log.txt').read_text()
  assert not h.wait_gone(workers), 'worker_binary left after the signal'
