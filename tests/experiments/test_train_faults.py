"""Faults of `experiments/train.py` (subprocess, end to end): kill -9 and
resume, two workers on loopback, a worker killed or frozen mid-run, signals
in every phase, the output-directory lock, divergence."""

import os
import re
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


def test_kill9_inside_a_block_of_rounds_resumes_exactly(tmp_path, baseline):
  """With checkpoints every 6 rounds, rounds 7-12 run in one invocation
  (`perfed_tff.accelerator.round_blocks`). The worker is frozen once that block
  is sent, so the trainer is killed while the block is in flight; the
  resume starts from round 6 and computes the block again."""
  out = tmp_path / 'out'
  run_dir = out / 'per_fedavg_fo'
  csv_path = run_dir / 'metrics' / 'train.csv'
  manifest = run_dir / 'checkpoints' / 'program_state_6' / (
      'perfed_tff_manifest.json')
  flags = (ROUNDS, f'--root_output_dir={out}', '--checkpoint_every=6')
  proc = h.start(*flags, log_path=tmp_path / 'log.txt')
  h.wait_for_round(proc, csv_path, 6)
  deadline = time.monotonic() + 60
  while not manifest.exists():
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  workers = h.worker_descendants(proc.pid)
  assert workers
  for worker in workers:
    worker.suspend()
  # Health checks start 2 s into a phase: kill before the run notices.
  time.sleep(0.8)
  assert h.csv_rounds(csv_path) == list(range(1, 7))
  h.kill9(proc)
  for worker in workers:
    try:
      worker.resume()
    except Exception:  # pylint: disable=broad-except
      pass
  assert not h.wait_gone(workers), 'worker_binary outlived kill -9'
  r = h.run(*flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resuming from round 6' in r.stderr + r.stdout, r.stderr[-2000:]
  assert h.csv_rounds(csv_path) == list(range(1, 13))
  h.assert_weights_close(h.final_weights(run_dir), baseline, atol=0.0)


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


def test_killed_local_worker_is_reported_at_once(tmp_path):
  """A local worker killed mid-run: its exit is known at once, so the run
  ends within seconds (not after --worker_timeout=120) with one line naming
  the worker, its exit status and the round."""
  csv_path = tmp_path / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  log = tmp_path / 'log.txt'
  proc = h.start('--rounds=100000', f'--root_output_dir={tmp_path}',
                 '--worker_timeout=120', log_path=log)
  h.wait_for_round(proc, csv_path, 3)
  workers = h.worker_descendants(proc.pid)
  assert len(workers) == 1
  workers[0].kill()
  t0 = time.monotonic()
  proc.wait(timeout=200)
  waited = time.monotonic() - t0
  text = log.read_text()
  line = h.assert_one_error_line(text)
  print(f'killed local worker reported after {waited:.1f}s')
  assert proc.returncode == 1, text[-3000:]
  assert re.match(rf'train.py: error: local TFF worker at localhost:\d+ \(pid '
                  rf'{workers[0].pid}\) exited with status -9 during rounds? '
                  r'\d+(-\d+)?; stopped the run. Rerun the same command', line), line
  assert waited < 60  # The retry wait would be 120 s.


def test_unreachable_worker_fresh_run_vs_resumed_run(tmp_path):
  """No worker at a --workers address: on a fresh run nothing can be
  resumed, so the line says what to check (exit 2); a run with a checkpoint
  keeps the resume advice (exit 1)."""
  port = portpicker.pick_unused_port()  # Nobody listens.
  flags = (f'--root_output_dir={tmp_path}', f'--workers=localhost:{port}',
           '--worker_timeout=1')
  r = h.run('--rounds=2', *flags)
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 2, r.stderr[-3000:]
  assert line.startswith(f'train.py: error: --workers: no TFF worker '
                         f'answered at localhost:{port} within 1s'), line
  assert 'resume' not in line and 'checkpoint' not in line, line
  assert not (tmp_path / 'per_fedavg_fo').exists()
  r = h.run('--rounds=1', f'--root_output_dir={tmp_path}')
  assert r.returncode == 0, r.stderr[-3000:]
  r = h.run('--rounds=2', *flags)
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 1, r.stderr[-3000:]
  assert f'TFF worker at localhost:{port} did not become ready' in line, line
  assert line.endswith('Rerun the same command to resume from the last '
                       'checkpoint.'), line


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
  text = (tmp_path / 'log.txt').read_text()
  line = h.assert_one_error_line(text)
  assert proc.returncode == 128 + signum
  what = 'interrupted' if signum == signal.SIGINT else 'stopped by SIGTERM'
  assert re.match(rf'train.py: error: {what}( during [^;]+)?; rerun the same '
                  'command', line), line
  assert not h.wait_gone(workers), 'worker_binary left after the signal'


# ------------------------------------------------------------ frozen worker

def test_frozen_local_worker_ends_run_then_resume_is_exact(tmp_path,
                                                           baseline):
  """SIGSTOP on the local worker (a hung worker or a dead link): one line
  naming it, exit 1, the worker killed, no worker log left in the temp
  folder; rerunning resumes to the uninterrupted run's weights, and
  TensorBoard holds every round once."""
  out, temp = tmp_path / 'out', tmp_path / 'temp'
  temp.mkdir()
  csv_path = out / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  log = tmp_path / 'log.txt'
  proc = h.start(ROUNDS, f'--root_output_dir={out}', log_path=log,
                 extra_env={'TMPDIR': str(temp)})
  h.wait_for_round(proc, csv_path, 5)
  workers = h.worker_descendants(proc.pid)
  assert len(workers) == 1
  workers[0].send_signal(signal.SIGSTOP)
  t0 = time.monotonic()
  proc.wait(timeout=120)
  waited = time.monotonic() - t0
  text = log.read_text()
  line = h.assert_one_error_line(text)
  print(f'frozen local worker reported after {waited:.1f}s')
  assert proc.returncode == 1, text[-3000:]
  assert re.match(rf'train.py: error: local TFF worker at localhost:\d+ \(pid '
                  rf'{workers[0].pid}\) is stopped \(frozen\) during rounds? '
                  r'\d+(-\d+)?; stopped the run. Rerun the same command', line), line
  assert waited < 30
  assert not h.wait_gone(workers), 'the frozen worker was left behind'
  assert not [n for n in os.listdir(temp) if n.startswith('tff_worker_')], (
      'worker log left in the temp folder')
  r = h.run(ROUNDS, f'--root_output_dir={out}', extra_env={'TMPDIR': str(temp)})
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from round' in r.stdout
  assert h.csv_rounds(csv_path) == list(range(1, 13))
  h.assert_weights_close(h.final_weights(out / 'per_fedavg_fo'), baseline,
                         atol=1e-6)
  steps = h.tensorboard_steps(out / 'per_fedavg_fo' / 'tensorboard')
  assert len(steps) == len(set(steps)), 'a round is in TensorBoard twice'
  assert {s for _, _, s in steps} == set(range(1, 13))
  assert not [n for n in os.listdir(temp) if n.startswith('tff_worker_')]


def test_frozen_remote_worker_ends_run_naming_it(tmp_path, two_workers):
  ports, procs, _ = two_workers
  workers = '--workers=' + ','.join(f'localhost:{p}' for p in ports)
  csv_path = tmp_path / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  log = tmp_path / 'run.log'
  proc = h.start('--rounds=100000', f'--root_output_dir={tmp_path}', workers,
                 log_path=log)
  h.wait_for_round(proc, csv_path, 3)
  procs[ports[1]].send_signal(signal.SIGSTOP)
  t0 = time.monotonic()
  proc.wait(timeout=120)
  waited = time.monotonic() - t0
  text = log.read_text()
  line = h.assert_one_error_line(text)
  print(f'frozen remote worker reported after {waited:.1f}s')
  assert proc.returncode == 1, text[-3000:]
  assert (f'TFF worker at localhost:{ports[1]} did not answer a health check '
          'within 5s') in line, line
  assert waited < 40


# ------------------------------------------------------------------ signals

def _sigint_ignored_sighup_default():  # Runs in the child before exec.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _interrupt(proc, signum, log):
  proc.send_signal(signum)
  proc.wait(timeout=60)
  text = log.read_text()
  assert proc.returncode == 128 + signum, text[-3000:]
  line = h.assert_one_error_line(text)
  assert not h.worker_descendants(proc.pid)
  log.unlink()
  return line


def test_signals_in_every_phase_then_resume_is_exact(tmp_path, baseline):
  out = tmp_path / 'out'
  run_dir = out / 'per_fedavg_fo'
  csv_path = run_dir / 'metrics' / 'train.csv'
  eval_csv = run_dir / 'metrics' / 'eval.csv'
  log = tmp_path / 'log.txt'
  flags = (ROUNDS, f'--root_output_dir={out}')
  # Start-up (TensorFlow still importing): one line, nothing written.
  proc = h.start(*flags, log_path=log)
  time.sleep(1.0)
  line = _interrupt(proc, signal.SIGINT, log)
  assert line == ('train.py: error: SIGINT during start-up; nothing was '
                  'written.'), line
  assert not out.exists()
  # Training.
  proc = h.start(*flags, log_path=log)
  h.wait_for_round(proc, csv_path, 3)
  line = _interrupt(proc, signal.SIGINT, log)
  assert re.match(r'train.py: error: interrupted( during [^;]+)?; rerun the '
                  'same command to resume from the last checkpoint.', line)
  # Evaluation (all 30 users, 5 adaptation lengths: most of a round's time).
  evals = ('--eval_every=1', '--eval_clients=0',
           '--eval_steps=1,2,3,5,8,20,40')
  for delay in (0.3, 0.1, 0.6, 0.05, 0.2):
    proc = h.start(*flags, *evals, log_path=log)
    start = max(h.csv_rounds(csv_path))
    deadline = time.monotonic() + 180
    while max(h.csv_rounds(eval_csv) or [0]) <= start:
      assert proc.poll() is None and time.monotonic() < deadline
      time.sleep(0.02)
    time.sleep(delay)
    line = _interrupt(proc, signal.SIGINT, log)
    if 'during evaluation at round' in line:
      break
  assert re.match(r'train.py: error: interrupted during evaluation at round '
                  r'\d+; rerun the same command', line), line
  # Started with SIGINT ignored (a background job): Ctrl-C on its process
  # group changes nothing, the worker keeps running; SIGHUP then stops it
  # (its default disposition, whatever this process has: under nohup it
  # would be ignored, and stay so).
  proc = h.start(*flags, log_path=log, start_new_session=True,
                 preexec_fn=_sigint_ignored_sighup_default)
  reached = h.wait_for_round(proc, csv_path, max(h.csv_rounds(csv_path)) + 1)
  workers = h.worker_descendants(proc.pid)
  os.killpg(proc.pid, signal.SIGINT)
  h.wait_for_round(proc, csv_path, reached + 1)
  assert all(w.is_running() for w in workers)
  line = _interrupt(proc, signal.SIGHUP, log)
  assert re.match(r'train.py: error: stopped by SIGHUP( during [^;]+)?; rerun '
                  'the same command', line), line
  assert max(h.csv_rounds(csv_path)) < 12
  # Each time the last complete checkpoint was kept: the resume is exact.
  r = h.run(*flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert h.csv_rounds(csv_path) == list(range(1, 13))
  h.assert_weights_close(h.final_weights(run_dir), baseline, atol=1e-6)
  steps = h.tensorboard_steps(run_dir / 'tensorboard')
  assert len(steps) == len(set(steps)), 'a round is in TensorBoard twice'


# ------------------------------------------------------ damaged checkpoint

def test_damaged_checkpoint_set_aside_resume_exact_then_none_intact(
    tmp_path, baseline):
  """A flipped bit in the newest checkpoint: the rerun warns in one line,
  sets it aside (renamed, byte for byte) and resumes from the newest intact
  one to the uninterrupted run's weights, bit for bit. With every checkpoint
  damaged: one error line, exit 2, nothing in the run folder changed."""
  out = tmp_path / 'out'
  run_dir = out / 'per_fedavg_fo'
  ckpts = run_dir / 'checkpoints'
  r = h.run('--rounds=6', f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  bad = ckpts / 'program_state_6'
  h.damage_checkpoint(bad, 'bit_flip')
  kept = h.snapshot(bad)
  r = h.run(ROUNDS, f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if 'warning' in l.lower()
              and 'Warning: ' not in l]  # Not Python's UserWarning lines.
  assert len(warnings) == 1, r.stderr[-3000:]
  match = re.search(
      rf'warning: checkpoint round 6 \({re.escape(str(bad))}\) is unreadable '
      r'\(checksum mismatch: variables/variables\.data-00000-of-00001\); '
      r'set aside as (program_state_6\.damaged-\S+); resuming from round '
      r'4$', warnings[0])
  assert match, warnings[0]
  assert 'resumed from round 4' in r.stdout
  assert h.snapshot(ckpts / match[1]) == kept
  assert h.csv_rounds(run_dir / 'metrics' / 'train.csv') == list(range(1, 13))
  h.assert_weights_close(h.final_weights(run_dir), baseline, atol=0)
  # Every checkpoint damaged: no silent start from round 0.
  versions = [n for n in os.listdir(ckpts)
              if re.fullmatch(r'program_state_\d+', n)]
  assert sorted(versions) == ['program_state_10', 'program_state_12',
                              'program_state_8']
  for name in versions:
    h.damage_checkpoint(ckpts / name, 'truncated')
  before = h.snapshot(out)
  r = h.run(ROUNDS, f'--root_output_dir={out}')
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 2, r.stderr[-3000:]
  assert line.startswith(f'train.py: error: no intact checkpoint to resume '
                         f'in {ckpts} (round 12: truncated: '), line
  assert line.endswith('to start over, move that folder away (or choose '
                       'another --root_output_dir), then rerun.'), line
  assert 'warning' not in r.stderr.lower().replace('userwarning', '')
  assert h.snapshot(out) == before


# --------------------------------------------------------------------- lock

def test_second_run_on_the_same_dir_refused_then_stale_lock_taken_over(
    tmp_path):
  out = tmp_path / 'out'
  csv_path = out / 'per_fedavg_fo' / 'metrics' / 'train.csv'
  proc = h.start('--rounds=100000', f'--root_output_dir={out}',
                 log_path=tmp_path / 'first.log')
  h.wait_for_round(proc, csv_path, 2)
  for module, flags in (
      ('experiments.train', ('--algorithm=fedavg', '--rounds=2')),
      ('experiments.compare', ('--algorithms=fedavg', '--seeds=0',
                               '--rounds=1', '--dataset=synthetic',
                               '--eval_every=0', '--noprogress'))):
    r = h.run(*flags, f'--root_output_dir={out}', module=module)
    program = module.split('.')[1] + '.py'
    line = h.assert_one_error_line(r.stderr, program)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f'--root_output_dir: {out} is in use by a running run (pid '
            f'{proc.pid} on ') in line, line
  assert sorted(os.listdir(out)) == ['.perfed_tff.lock', 'per_fedavg_fo']
  reached = max(h.csv_rounds(csv_path))
  h.wait_for_round(proc, csv_path, reached + 1)  # The first run goes on.
  h.kill9(proc)
  rounds = max(h.csv_rounds(csv_path)) + 1
  r = h.run(f'--rounds={rounds}', f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert (f'took over the lock of a run that is no longer running (pid '
          f'{proc.pid}') in r.stderr
  assert not (out / '.perfed_tff.lock').exists()


def test_a_directory_in_place_of_the_lock_file_is_refused(tmp_path):
  """Rerunning cannot help: the line says what to remove, exit 2, and the
  folder (with what it holds) is left alone."""
  lock = tmp_path / '.perfed_tff.lock'
  lock.mkdir()
  (lock / 'keep.txt').write_text('mine')
  r = h.run('--rounds=1', f'--root_output_dir={tmp_path}')
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 2, r.stderr[-3000:]
  assert line == (f'train.py: error: --root_output_dir: {lock} is a '
                  'directory: it is not the lock file this program keeps '
                  'there; move it away or remove it, then rerun'), line
  assert (lock / 'keep.txt').read_text() == 'mine'
  assert sorted(os.listdir(tmp_path)) == ['.perfed_tff.lock']


# --------------------------------------------------------------- divergence

@pytest.mark.parametrize('flags,text', [
    (('--beta=1e6',), 'per_fedavg_fo: the training loss exploded to '),
    (('--dataset=digits', '--algorithm=per_fedavg_hf', '--alpha=1e6',
      '--beta=1e6'), 'per_fedavg_hf: no client update was usable (all '
     'non-finite, or no client took a step) in rounds 1-3'),
])
def test_divergence_stops_with_exit_1(tmp_path, flags, text):
  r = h.run('--rounds=10', f'--root_output_dir={tmp_path}', *flags)
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 1, r.stderr[-3000:]
  assert text in line and 'Likely too large: --beta=1e+06' in line, line
