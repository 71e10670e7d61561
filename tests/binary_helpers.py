"""Helpers (no tests) of the train-binary tests: run `experiments/train.py` as a
subprocess, watch its metrics CSV, compare final weights."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: synthetic data (30 users), softmax regression.
BASE_FLAGS = ('--algorithm=per_fedavg_fo', '--dataset=synthetic',
              '--clients_per_round=5', '--local_steps=2', '--batch_size=8',
              '--alpha=0.01', '--beta=0.05', '--seed=3', '--noprogress',
              '--eval_every=0', '--checkpoint_every=2', '--worker_timeout=5')


def env():
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  e['TF_CPP_MIN_LOG_LEVEL'] = '2'
  e['CUDA_VISIBLE_DEVICES'] = ''
  return e


def command(*flags):
  return [sys.executable, '-m', 'experiments.train', *BASE_FLAGS, *flags]


def run(*flags, timeout=240):
  """Runs the binary to the end; returns CompletedProcess (text)."""
  return subprocess.run(command(*flags), env=env(), capture_output=True,
                        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                        cwd=ROOT)


def start(*flags, log_path):
  """Starts the binary in the background, output to `log_path`."""
  log = open(log_path, 'ab')
  return subprocess.Popen(command(*flags), env=env(), stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          cwd=ROOT)


def csv_rounds(path):
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return [int(r['round']) for r in csv.DictReader(f)]


def wait_for_round(proc, csv_path, round_num, timeout=180):
  """Waits until `csv_path` holds a row for `round_num` (or more)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    rounds = csv_rounds(csv_path)
    if rounds and max(rounds) >= round_num:
      return max(rounds)
    if proc.poll() is not None:
      raise AssertionError(f'binary exited early with {proc.returncode}')
    time.sleep(0.02)
  raise AssertionError(f'round {round_num} not reached in {timeout}s')


def worker_descendants(pid):
  try:
    proc = psutil.Process(pid)
    return [p for p in proc.children(recursive=True)
            if 'worker_binary' in ' '.join(p.cmdline() or [])]
  except psutil.NoSuchProcess:
    return []


def wait_gone(procs, timeout=15):
  deadline = time.monotonic() + timeout
  alive = list(procs)
  while alive and time.monotonic() < deadline:
    alive = [p for p in alive if p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE]
    time.sleep(0.1)
  return alive


def kill9(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)


def final_weights(run_dir):
  with np.load(os.path.join(run_dir, 'final_model.npz')) as f:
    return {k: f[k] for k in f.files}


def assert_weights_close(a, b, atol):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)
