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


# The folder where the binaries the tests start keep their traced and
# compiled computations, one for the test session (conftest sets it): a
# binary run with the settings of an earlier one starts without tracing and
# compiling them again, as on a user's machine. In-process tests keep the
# caches off (conftest); the cache tests use folders of their own.
COMPUTATION_CACHE = None


def env(extra=None):
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  e['TF_CPP_MIN_LOG_LEVEL'] = '2'
  e['CUDA_VISIBLE_DEVICES'] = ''
  if COMPUTATION_CACHE:
    e['PERFED_TFF_COMPUTATION_CACHE'] = COMPUTATION_CACHE
  e.update(extra or {})
  return e


def command(*flags, module='experiments.train'):
  base = BASE_FLAGS if module == 'experiments.train' else ()
  return [sys.executable, '-m', module, *base, *flags]


def run(*flags, timeout=240, extra_env=None, module='experiments.train'):
  """Runs the binary to the end; returns CompletedProcess (text)."""
  return subprocess.run(command(*flags, module=module), env=env(extra_env),
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL, cwd=ROOT)


def _signals_as_from_a_terminal():  # Runs in the child before exec.
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(*flags, log_path, extra_env=None, **popen_kwargs):
  """Starts the binary in the background, output to `log_path`, with
  SIGINT and SIGHUP at their defaults as from a terminal, whatever this
  test run inherited (a shell's background job ignores SIGINT, and the
  binaries leave an ignored signal ignored), unless `preexec_fn` is
  given."""
  popen_kwargs.setdefault('preexec_fn', _signals_as_from_a_terminal)
  log = open(log_path, 'ab')
  return subprocess.Popen(command(*flags), env=env(extra_env), stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          cwd=ROOT, **popen_kwargs)


def error_lines(text, program='train.py'):
  """The `<program>: error:` lines of a binary's output; a traceback (or a
  C++ abort) fails the caller's test through `assert_one_error_line`."""
  return [l for l in text.splitlines() if l.startswith(f'{program}: error')]


def assert_one_error_line(text, program='train.py'):
  """Exactly one error line and no traceback; returns the line."""
  lines = error_lines(text, program)
  assert len(lines) == 1, text[-3000:]
  assert 'Traceback' not in text and 'terminate called' not in text, (
      text[-3000:])
  return lines[0]


def tensorboard_steps(log_dir):
  """[(tag, step)] of every summary in the event files under `log_dir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = []
  for root, _, names in os.walk(log_dir):
    for name in names:
      if '.tfevents.' not in name:
        continue
      for raw in tf.data.TFRecordDataset(os.path.join(root, name)):
        event = tf.compat.v1.Event.FromString(raw.numpy())
        for value in event.summary.value:
          out.append((os.path.relpath(root, log_dir), value.tag, event.step))
  return out


def snapshot(directory):
  """{relative path: bytes (None for a folder)} of everything under
  `directory`."""
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


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


def damage_checkpoint(path, kind):
  """Damages the checkpoint folder `path` (a pathlib.Path): 'truncated' (its
  variables' data loses 7 bytes), 'bit_flip' (one bit of that data),
  'bit_flip_no_manifest' (the same in a checkpoint as older code wrote it,
  without a manifest), 'missing_part' (no variables index), 'empty_folder',
  'not_a_folder' (an empty file in its place)."""
  import shutil  # pylint: disable=g-import-not-at-top
  data = path / 'variables' / 'variables.data-00000-of-00001'
  if kind == 'truncated':
    data.write_bytes(data.read_bytes()[:-7])
  elif kind in ('bit_flip', 'bit_flip_no_manifest'):
    if kind == 'bit_flip_no_manifest':
      (path / 'perfed_tff_manifest.json').unlink()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
  elif kind == 'missing_part':
    (path / 'variables' / 'variables.index').unlink()
  elif kind == 'empty_folder':
    shutil.rmtree(path)
    path.mkdir()
  elif kind == 'not_a_folder':
    shutil.rmtree(path)
    path.write_bytes(b'')
  else:
    raise ValueError(kind)
