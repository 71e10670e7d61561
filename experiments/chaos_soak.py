r"""Runs training under random faults and checks it ends as an uninterrupted run.

  nice -n 10 .venv/bin/python -m experiments.chaos_soak --rounds=300 --seed=0 \
      --root_output_dir=/tmp/perfed_tff_chaos   # as root, for the tmpfs

First it runs the training command (`python -m experiments.train` with
--train_flags, --rounds and --root_output_dir=<root>/reference) to its end
without faults (a finished reference with the same command is reused). Then
it runs the same command on <root>/chaos and, every --min_interval to
--max_interval seconds (drawn from --seed), injects one fault, drawn from
--faults among those that apply at that moment:

* `kill_trainer`: SIGKILL of the trainer;
* `term_trainer`: SIGTERM of the trainer (expected: exit 143, one line);
* `stop_worker`: SIGSTOP of the trainer's local `worker_binary` for 1 to
  --max_stop_seconds seconds, then SIGCONT (expected: the watchdog stops the
  run with exit 1, or the run goes on);
* `kill_worker`: SIGKILL of the local worker (expected: exit 1, one line);
* `full_disk`: <root>/chaos is a tmpfs of --tmpfs_mb MiB mounted by this
  script (as root); a file fills it for 1 to --full_disk_seconds seconds,
  then is deleted (expected: exit 1 `the disk is full`, or no effect);
  skipped with a note where mount is not permitted;
* `damage_checkpoint`: SIGKILL of the trainer, then the newest checkpoint is
  damaged (a flipped byte, a truncated or deleted file) before the restart
  (expected: the resume sets it aside and continues from the one before;
  drawn only when there is one before).

After each fault it waits for the trainer to exit (at most --exit_timeout
seconds; longer is a hang and the trainer's tree is killed) or, after a fault
it may survive (a stopped worker, a full disk), to train two more rounds or
still run 15 s later; a trainer with no output and no new round for
--exit_timeout seconds is a hang too. It checks that a failed exit wrote
exactly one `train.py: error:` line, last, with no traceback, and a
documented exit status (1, 2, 129, 130, 143; -9 only after its own SIGKILL),
that no `worker_binary` of the trainer outlives it (a leftover is killed and
reported), and reruns the same command. A run that
ends on its own with a failure is a finding and is rerun too (3 in a row
without a fault in between: the soak stops). After --stalled_faults faults
in a row with no new checkpoint between them (start-up can take longer than
the intervals), the next fault waits for a new checkpoint, so the run always
gets through. A resume refused with exit 2 after a damaged checkpoint is a
finding; the soak moves the checkpoint to <root>/set_aside and reruns.

When the chaos run finishes, its `final_model.npz` files are compared
exactly (numpy) and its `metrics/*.csv` row by row (wall-clock columns
`*_time_in_seconds` excluded) with the reference. The report (stdout table
and --output JSON, also written when the soak is interrupted): faults by
kind and their outcomes (exit statuses, error lines with numbers blanked),
reaction seconds (from the fault to the trainer's exit, or to its second
round after the fault ended), restarts, rounds trained again, time lost
(chaos wall time minus the reference's), identical or not (and where), what
the run left (checkpoints it set aside, worker logs and autograph files in
the lives' TMPDIR, <root>/tmp) and findings (tracebacks, hangs, leftover
processes, undocumented statuses, failures without a fault). Every life's
stdout/stderr is in <root>/logs. Exit status: 0 when the chaos run finished
identical to the reference with no findings, 1 otherwise, 2 for a bad flag.
"""

from __future__ import annotations

import collections
import csv
import errno
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.basename(__file__)

FAULTS = ('kill_trainer', 'term_trainer', 'stop_worker', 'kill_worker',
          'full_disk', 'damage_checkpoint')
# Digits rounds take 0.1 s: 300 local steps per client and an evaluation every
# 5 rounds make the uninterrupted run last minutes (3.6 min on 2 quiet cores),
# so faults land in start-up, rounds, evaluations and checkpoint writes.
DEFAULT_TRAIN_FLAGS = ('--algorithm=per_fedavg_hf --dataset=digits '
                       '--clients_per_round=10 --local_steps=300 '
                       '--eval_every=5 --checkpoint_every=10 --seed=0')
# Documented exit statuses: 0, 2 bad input, 1 failed run, 128 + signal.
DOCUMENTED = (0, 1, 2, 129, 130, 143)
EXPECTED = {  # Fault -> exit statuses that are as documented.
    'kill_trainer': (-signal.SIGKILL,),
    'damage_checkpoint': (-signal.SIGKILL,),
    'term_trainer': (143,),
    'kill_worker': (1,),
    'stop_worker': (1,),
    'full_disk': (1,),
}
TIME_COLUMNS = re.compile(r'(_time_in_seconds|timestamp|wall)', re.I)
# (file under the checkpoint folder, how) for `damage_checkpoint`.
DAMAGES = (('variables/variables.data-*', 'flip'),
           ('variables/variables.data-*', 'truncate'),
           ('variables/variables.index', 'delete'),
           ('variables/variables.index', 'truncate'),
           ('saved_model.pb', 'truncate'),
           ('saved_model.pb', 'flip'))
CHECKPOINT = re.compile(r'program_state_(\d+)$')
SETTLE_SECONDS = 15.0  # How long a fault that need not end the run is watched.

flags.DEFINE_integer('rounds', 300, 'Rounds of the training run, >= 1.')
flags.DEFINE_integer('seed', 0, 'Seed of the fault schedule (times, kinds, '
                     'durations, damage), >= 0.')
flags.DEFINE_float('min_interval', 10.0, 'Least seconds between faults, > 0.')
flags.DEFINE_float('max_interval', 40.0, 'Most seconds between faults, >= '
                   '--min_interval.')
flags.DEFINE_list('faults', list(FAULTS), f'Fault kinds to draw from: '
                  f'{", ".join(FAULTS)}.')
flags.DEFINE_string('root_output_dir', None, 'Directory of the soak: '
                    'reference/, chaos/ (the tmpfs), logs/, set_aside/, '
                    'chaos_result/. New, empty, or an earlier soak\'s (its '
                    'chaos run is redone, a matching reference reused).')
flags.DEFINE_string('output', '', 'JSON report (default: '
                    '<root_output_dir>/chaos_soak.json).')
flags.DEFINE_string('train_flags', DEFAULT_TRAIN_FLAGS, 'Flags of '
                    '`python -m experiments.train` (shell words) besides '
                    '--rounds, --root_output_dir and --noprogress, which '
                    'this script sets.')
flags.DEFINE_float('exit_timeout', 120.0, 'Seconds a trainer may take to '
                   'exit (or go on) after a fault before it counts as hung, '
                   '> 0.')
flags.DEFINE_float('max_stop_seconds', 8.0, 'stop_worker: longest SIGSTOP, '
                   '>= 1 (drawn from 1..this).')
flags.DEFINE_float('full_disk_seconds', 6.0, 'full_disk: longest time the '
                   'disk stays full, >= 1 (drawn from 1..this).')
flags.DEFINE_integer('tmpfs_mb', 64, 'Size of the tmpfs under the chaos run '
                     '(MiB), >= 8.')
flags.DEFINE_integer('max_faults', 0, 'Stop injecting after this many '
                     'faults (0: no limit); the run then finishes.')
flags.DEFINE_integer('stalled_faults', 3, 'After this many faults in a row '
                     'with no new checkpoint between them, the next fault '
                     'waits for a new checkpoint (so the run cannot be '
                     'stalled forever when start-up takes longer than the '
                     'intervals), >= 1.')
flags.DEFINE_float('timeout', 4 * 3600.0, 'Seconds the whole chaos run may '
                   'take before the soak gives up, > 0.')
FLAGS = flags.FLAGS


class Interrupted(Exception):
  """SIGINT/SIGTERM/SIGHUP of this script."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def fail(message: str, status: int = 2):
  print(f'{PROGRAM}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parser, its errors one line with exit 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}')
  return rest


def check_flags() -> list[str]:
  """Checks every flag before any work (one line, exit 2); returns the
  training flags."""
  if FLAGS.rounds < 1:
    fail(f'--rounds: must be >= 1, got {FLAGS.rounds}')
  if FLAGS.seed < 0:
    fail(f'--seed: must be >= 0, got {FLAGS.seed}')
  for name in ('min_interval', 'exit_timeout', 'timeout'):
    value = FLAGS[name].value
    if not (np.isfinite(value) and value > 0):
      fail(f'--{name}: must be a finite number > 0, got {value}')
  if not (np.isfinite(FLAGS.max_interval)
          and FLAGS.max_interval >= FLAGS.min_interval):
    fail(f'--max_interval: must be >= --min_interval ({FLAGS.min_interval}),'
         f' got {FLAGS.max_interval}')
  for name in ('max_stop_seconds', 'full_disk_seconds'):
    value = FLAGS[name].value
    if not (np.isfinite(value) and value >= 1):
      fail(f'--{name}: must be a finite number >= 1, got {value}')
  if FLAGS.tmpfs_mb < 8:
    fail(f'--tmpfs_mb: must be >= 8, got {FLAGS.tmpfs_mb}')
  if FLAGS.stalled_faults < 1:
    fail(f'--stalled_faults: must be >= 1, got {FLAGS.stalled_faults}')
  if FLAGS.max_faults < 0:
    fail(f'--max_faults: must be >= 0, got {FLAGS.max_faults}')
  unknown = [f for f in FLAGS.faults if f not in FAULTS]
  if unknown or not FLAGS.faults:
    fail(f'--faults: must be a non-empty list of {", ".join(FAULTS)}, got '
         f'{",".join(FLAGS.faults) or "nothing"}')
  if not FLAGS.root_output_dir:
    fail('--root_output_dir: required (a new or empty directory, or an '
         'earlier soak\'s)')
  root = os.path.abspath(FLAGS.root_output_dir)
  if (os.path.exists(root) and not os.path.isdir(root)):
    fail(f'--root_output_dir: {root} is not a directory')
  if (os.path.isdir(root) and os.listdir(root)
      and not os.path.exists(os.path.join(root, '.chaos_soak'))):
    fail(f'--root_output_dir: {root} is not empty and holds no earlier '
         'chaos soak; choose a new or empty directory')
  try:
    train_flags = shlex.split(FLAGS.train_flags)
  except ValueError as e:
    fail(f'--train_flags: {e}')
  for word in train_flags:
    name = word.lstrip('-').split('=')[0]
    if name in ('rounds', 'root_output_dir', 'progress', 'noprogress'):
      fail(f'--train_flags: must not set --{name} (this script sets it), '
           f'got {word}')
    if name == 'workers':
      fail('--train_flags: must not set --workers (the soak targets the '
           'local worker)')
  if FLAGS.output and os.path.isdir(FLAGS.output):
    fail(f'--output: {FLAGS.output} is a directory')
  return train_flags


# ------------------------------------------------------------- processes

def _alive(p: psutil.Process) -> bool:
  try:
    return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def _kill(p: psutil.Process) -> None:
  try:
    p.kill()
    p.send_signal(signal.SIGCONT)  # A stopped process dies too.
  except psutil.NoSuchProcess:
    pass


def _wait_gone(procs, timeout: float) -> list:
  deadline = time.monotonic() + timeout
  alive = list(procs)
  while alive and time.monotonic() < deadline:
    alive = [p for p in alive if _alive(p)]
    if alive:
      time.sleep(0.1)
  return alive


def _group_members(pgid: int) -> list:
  out = []
  for p in psutil.process_iter(['pid']):
    try:
      if p.pid != os.getpid() and os.getpgid(p.pid) == pgid and _alive(p):
        out.append(p)
    except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
      pass
  return out


def _last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ''


def _shape(line: str) -> str:
  """An error line with its numbers, ports and paths blanked, to group the
  same message."""
  line = re.sub(r'/[^\s;)]+', '<path>', line)
  return re.sub(r'\d+(\.\d+)?', 'N', line)


class Life:
  """One run of the training command (a process group of its own)."""

  def __init__(self, index, command: list, log_dir: str, tmp_dir: str):
    self.index = index
    name = index if isinstance(index, str) else f'life_{index:03d}'
    self.stderr_path = os.path.join(log_dir, f'{name}.stderr')
    self.stdout_path = os.path.join(log_dir, f'{name}.stdout')
    self._files = [open(self.stdout_path, 'wb'), open(self.stderr_path, 'wb')]
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    env['TMPDIR'] = tmp_dir  # Worker logs: leftovers are counted.
    self.started = time.monotonic()
    self.proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=self._files[0],
        stderr=self._files[1], cwd=ROOT, env=env, start_new_session=True)
    self.process = psutil.Process(self.proc.pid)
    self.workers: dict[int, psutil.Process] = {}

  def refresh_workers(self) -> None:
    try:
      for p in self.process.children(recursive=True):
        try:
          if p.pid not in self.workers and 'worker_binary' in ' '.join(
              p.cmdline()):
            self.workers[p.pid] = p
        except psutil.Error:
          pass
    except psutil.Error:
      pass

  def worker(self):
    self.refresh_workers()
    alive = [p for p in self.workers.values() if _alive(p)]
    return alive[-1] if alive else None

  def running(self) -> bool:
    return self.proc.poll() is None

  def idle_seconds(self, run_root: str) -> float:
    """Seconds since its stderr last grew or a round was last recorded."""
    try:
      size = os.path.getsize(self.stderr_path)
    except OSError:
      size = 0
    key = (size, progress(run_root))
    now = time.monotonic()
    if key != getattr(self, '_activity', None):
      self._activity, self._active_at = key, now
    return now - getattr(self, '_active_at', now)

  def wait(self, timeout: float) -> bool:
    try:
      self.proc.wait(timeout=max(timeout, 0))
      return True
    except subprocess.TimeoutExpired:
      return False

  def kill_tree(self) -> list:
    """SIGKILLs the trainer, its group and its workers; returns the pids of
    the group members and workers that were still alive."""
    left = [p for p in _group_members(self.proc.pid) if p.pid != self.proc.pid]
    left += [p for p in self.workers.values() if _alive(p)]
    if self.running():
      _kill(self.process)
    for p in left:
      _kill(p)
    self.proc.wait()
    _wait_gone(left, 10)
    return sorted({p.pid for p in left})

  def close(self) -> None:
    for f in self._files:
      f.close()

  def stderr(self) -> str:
    with open(self.stderr_path, errors='replace') as f:
      return f.read()


# ------------------------------------------------------------- run files

def _csv_max_round(path: str) -> int:
  try:
    with open(path, newline='') as f:
      rounds = [int(r['round']) for r in csv.DictReader(f)
                if (r.get('round') or '').isdigit()]
  except (OSError, KeyError, ValueError, csv.Error):
    return 0
  return max(rounds, default=0)


def progress(run_root: str) -> int:
  """Sum over the runs under `run_root` of the last round in train.csv."""
  return sum(_csv_max_round(p) for p in
             glob.glob(os.path.join(run_root, '**', 'metrics', 'train.csv'),
                       recursive=True))


def checkpoints(run_root: str) -> list:
  """[(round, path)] of every `program_state_<n>` under `run_root`,
  highest round first."""
  found = []
  for dirpath, dirnames, _ in os.walk(run_root):
    if os.path.basename(dirpath) == 'checkpoints':
      found += [(int(m[1]), os.path.join(dirpath, name)) for name in dirnames
                for m in [CHECKPOINT.match(name)] if m]
  return sorted(found, reverse=True)


def newest_checkpoint(run_root: str):
  """(round, path) of the highest `program_state_<n>` under `run_root`."""
  found = checkpoints(run_root)
  return found[0] if found else None


def damageable_checkpoint(run_root: str):
  """The newest checkpoint when its folder holds an older one to resume
  from (a run with a single checkpoint cannot heal; it refuses, exit 2)."""
  found = checkpoints(run_root)
  if found and any(os.path.dirname(p) == os.path.dirname(found[0][1])
                   for _, p in found[1:]):
    return found[0]
  return None


def damage(path: str, rng: random.Random) -> dict:
  """Damages one file of the checkpoint folder `path`; returns what."""
  options = [(pattern, how) for pattern, how in DAMAGES
             if glob.glob(os.path.join(path, pattern))]
  if not options:
    return dict(file=None, how='none (no file to damage)')
  pattern, how = rng.choice(options)
  target = sorted(glob.glob(os.path.join(path, pattern)))[0]
  size = os.path.getsize(target)
  info = dict(file=os.path.relpath(target, path), how=how, size=size)
  if how == 'delete':
    os.remove(target)
  elif how == 'truncate':
    os.truncate(target, size // 2)
    info['new_size'] = size // 2
  else:  # flip
    offset = rng.randrange(max(size, 1))
    with open(target, 'r+b') as f:
      f.seek(offset)
      byte = f.read(1)
      f.seek(offset)
      f.write(bytes([(byte[0] if byte else 0) ^ 0xFF]))
    info['offset'] = offset
  return info


def result_files(run_root: str) -> list[str]:
  """Relative paths of the final weights and metric files under `run_root`."""
  found = glob.glob(os.path.join(run_root, '**', 'final_model.npz'),
                    recursive=True)
  found += glob.glob(os.path.join(run_root, '**', 'metrics', '*.csv'),
                     recursive=True)
  return sorted(os.path.relpath(p, run_root) for p in found)


def compare_npz(a_path: str, b_path: str):
  """None when equal bit for bit, else what differs."""
  with np.load(a_path) as a, np.load(b_path) as b:
    if sorted(a.files) != sorted(b.files):
      return f'arrays {sorted(a.files)} vs {sorted(b.files)}'
    diffs = []
    for k in sorted(a.files):
      x, y = a[k], b[k]
      if x.dtype != y.dtype or x.shape != y.shape:
        diffs.append(f'{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}')
      elif not np.array_equal(x, y):
        d = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
        diffs.append(f'{k}: max |diff| {d:.3g}')
  return '; '.join(diffs) or None


def compare_csv(a_path: str, b_path: str):
  """None when the rows are equal (wall-clock columns excluded), else the
  first difference."""
  def rows(path):
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      return reader.fieldnames or [], list(reader)
  cols_a, rows_a = rows(a_path)
  cols_b, rows_b = rows(b_path)
  if cols_a != cols_b:
    return f'columns differ: {sorted(set(cols_a) ^ set(cols_b))}'
  if len(rows_a) != len(rows_b):
    return f'{len(rows_a)} rows vs {len(rows_b)}'
  kept = [c for c in cols_a if not TIME_COLUMNS.search(c)]
  diffs = [(i, c) for i, (ra, rb) in enumerate(zip(rows_a, rows_b))
           for c in kept if ra.get(c) != rb.get(c)]
  if not diffs:
    return None
  i, c = diffs[0]
  return (f'{len(diffs)} values differ, first at round '
          f'{rows_a[i].get("round")} {c}: {rows_a[i].get(c)} vs '
          f'{rows_b[i].get(c)}')


def compare_runs(reference_root: str, chaos_root: str) -> dict:
  ref, got = result_files(reference_root), result_files(chaos_root)
  out = dict(compared=ref, missing=sorted(set(ref) - set(got)),
             extra=sorted(set(got) - set(ref)), differ={})
  for rel in sorted(set(ref) & set(got)):
    a, b = os.path.join(reference_root, rel), os.path.join(chaos_root, rel)
    try:
      diff = (compare_npz if rel.endswith('.npz') else compare_csv)(a, b)
    except Exception as e:  # pylint: disable=broad-except
      diff = f'unreadable: {type(e).__name__}: {e}'
    if diff:
      out['differ'][rel] = diff
  out['identical'] = bool(ref) and not (out['missing'] or out['extra']
                                        or out['differ'])
  return out


# ------------------------------------------------------------------ soak

class Soak:
  """The chaos run: lives of the training command, faults between them."""

  def __init__(self, root: str, command_for, kinds: list, rng):
    self.root = root
    self.chaos_root = os.path.join(root, 'chaos')
    self.log_dir = os.path.join(root, 'logs')
    self.command = command_for(self.chaos_root)
    self.kinds = kinds
    self.rng = rng
    self.lives: list[dict] = []
    self.faults: list[dict] = []
    self.findings: list[str] = []
    self.notes: list[str] = []
    self.mounted = self.used_tmpfs = False
    self.finished, self.wall_seconds, self.started = None, 0.0, None
    self.rounds_redone = 0
    self.manual_set_asides: list[str] = []
    self._pending_damage = None
    self._exit_round = None  # The last round in train.csv at the last exit.
    self._life = None
    self._last_fault_in_life = None  # (life, kind, time) of a survived one.
    self.hangs = 0
    self.deferred = 0  # Faults held back until a new checkpoint.
    self.deferred_seconds = 0.0

  def _checkpoint_round(self) -> int:
    newest = newest_checkpoint(self.chaos_root)
    return newest[0] if newest else -1

  # --- the tmpfs
  def mount(self) -> None:
    os.makedirs(self.chaos_root, exist_ok=True)
    if 'full_disk' not in self.kinds:
      return
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o',
                        f'size={FLAGS.tmpfs_mb}m', 'tmpfs', self.chaos_root],
                       capture_output=True, text=True)
    if r.returncode == 0:
      self.mounted = self.used_tmpfs = True
      return
    why = _last_line(r.stderr) or f'exit {r.returncode}'
    note = (f'full_disk skipped: cannot mount a tmpfs on {self.chaos_root} '
            f'({why})')
    print(note, flush=True)
    self.notes.append(note)
    self.kinds = [k for k in self.kinds if k != 'full_disk']

  def unmount(self) -> None:
    if not self.mounted:
      return
    result = os.path.join(self.root, 'chaos_result')
    shutil.rmtree(result, ignore_errors=True)
    shutil.copytree(self.chaos_root, result, symlinks=True)
    if subprocess.run(['umount', self.chaos_root]).returncode != 0:
      subprocess.run(['umount', '-l', self.chaos_root])
    self.mounted = False

  # --- lives
  def _start(self) -> Life:
    life = Life(len(self.lives), self.command, self.log_dir,
                os.path.join(self.root, 'tmp'))
    self._life = life
    return life

  def _finish(self, life: Life, fault=None) -> dict:
    """Records the end of `life` (already exited): status, line, leftovers."""
    life.close()
    text = life.stderr()
    rc = life.proc.returncode
    errors = [l for l in text.splitlines() if l.startswith('train.py: error')]
    last = _last_line(text)
    record = dict(index=life.index, seconds=round(time.monotonic()
                                                  - life.started, 1),
                  returncode=rc, last_line=last[:400],
                  fault=fault['kind'] if fault else None,
                  stderr=os.path.relpath(life.stderr_path, self.root))
    resumed = re.findall(r'resuming from round (\d+)', text)
    record['resumed_from'] = int(resumed[0]) if resumed else None
    if resumed and self._exit_round is not None:
      # Rounds after the checkpoint it resumed from are trained again (a
      # life killed before it logged its resume cut nothing).
      self.rounds_redone += max(0, self._exit_round - int(resumed[0]))
    heal = [l for l in text.splitlines()
            if re.search(r'set aside|aside|corrupt|damaged', l, re.I)]
    if heal:
      record['checkpoint_lines'] = [l[:400] for l in heal[:3]]
    where = f'life {life.index}'
    if 'Traceback' in text:
      self.findings.append(f'{where}: a traceback on stderr '
                           f'({record["stderr"]})')
      record['traceback'] = True
    expected = EXPECTED.get(record['fault'], ())
    if rc not in DOCUMENTED and rc not in expected:
      self.findings.append(f'{where}: exit status {rc} is not documented '
                           f'(after {record["fault"] or "no fault"}); last '
                           f'line: {last[:300]}')
    elif fault and rc != 0 and rc not in expected and not (
        fault['kind'] == 'damage_checkpoint'):
      self.findings.append(f'{where}: exit status {rc} after '
                           f'{fault["kind"]} (expected {expected}); last '
                           f'line: {last[:300]}')
    if rc not in (0, -signal.SIGKILL):
      if len(errors) != 1 or errors[0] != last:
        self.findings.append(
            f'{where}: exit {rc} with {len(errors)} error lines (one, last, '
            f'expected); last line: {last[:300]}')
      record['error_line'] = errors[-1][:400] if errors else None
    leftovers = [p for p in life.workers.values() if _alive(p)]
    leftovers = _wait_gone(leftovers, 10)
    group = [p for p in _group_members(life.proc.pid)]
    if leftovers or group:
      pids = sorted({p.pid for p in leftovers + group})
      states = []
      for p in leftovers + group:
        try:
          states.append(f'{p.pid} {p.name()} {p.status()}')
        except psutil.Error:
          pass
      self.findings.append(
          f'{where}: {len(pids)} process(es) of its tree outlived the trainer '
          f'(exit {rc}, after {record["fault"] or "no fault"}): '
          f'{"; ".join(states)}; killed')
      for p in leftovers + group:
        _kill(p)
      _wait_gone(leftovers + group, 10)
      record['leftovers'] = pids
    self._exit_round = progress(self.chaos_root)
    record['round_at_exit'] = self._exit_round
    self._judge_damage(record)
    self.lives.append(record)
    self._life = None
    cause = f' ({record["fault"]})' if record['fault'] else ''
    resumed = ('' if record['resumed_from'] is None
               else f', resumed from {record["resumed_from"]}')
    line = f': {last[:160]}' if rc not in (0, -9) else ''
    print(f'  life {life.index}: exit {rc} after {record["seconds"]}s{cause}, '
          f'round {self._exit_round}{resumed}{line}', flush=True)
    return record

  def _judge_damage(self, record: dict) -> None:
    """The next life after a damaged checkpoint: how it resumed."""
    pending = self._pending_damage
    if pending is None:
      return
    resumed = record['resumed_from']
    if resumed is not None:
      pending['next_life'] = record['index']
      pending['resumed_from'] = resumed
      if resumed >= pending['round']:
        pending['outcome'] = 'resumed from the damaged checkpoint'
        self.findings.append(
            f'life {record["index"]}: resumed from round {resumed} although '
            f'checkpoint round {pending["round"]} was damaged '
            f'({pending["damage"]})')
      else:
        pending['outcome'] = f'resumed from round {resumed} (set aside)'
      self._pending_damage = None
    elif record['returncode'] == 2:
      record['refused_damaged_checkpoint'] = True
      pending['outcome'] = 'resume refused (exit 2)'
      pending['next_life'] = record['index']
      self.findings.append(
          f'life {record["index"]}: the damaged checkpoint '
          f'{os.path.relpath(pending["path"], self.root)} '
          f'({pending["damage"]["file"]} {pending["damage"]["how"]}) was not '
          f'set aside: {record["last_line"][:300]}')
      if os.path.isdir(pending['path']):
        dest = os.path.join(self.root, 'set_aside',
                            f'{os.path.basename(pending["path"])}_life'
                            f'{record["index"]}')
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(pending['path'], dest)
        self.manual_set_asides.append(os.path.relpath(dest, self.root))
        pending['moved_by_soak'] = os.path.relpath(dest, self.root)
      self._pending_damage = None
    elif record['returncode'] == 0:
      pending['outcome'] = 'finished without logging a resume'
      self._pending_damage = None

  # --- faults
  def _applicable(self, life: Life) -> list:
    out = []
    for kind in self.kinds:
      if kind in ('stop_worker', 'kill_worker') and life.worker() is None:
        continue
      if kind == 'damage_checkpoint' and not damageable_checkpoint(
          self.chaos_root):
        continue
      if kind == 'full_disk' and not self.mounted:
        continue
      out.append(kind)
    return out

  def _record_exit(self, life: Life, fault: dict) -> None:
    record = self._finish(life, fault)
    fault['returncode'] = record['returncode']
    fault['error_line'] = record.get('error_line')

  def _await_end(self, life: Life, fault: dict) -> bool:
    """After a fault that may leave the trainer running: True when it
    exited within SETTLE_SECONDS; False when it went on (two new rounds
    after the fault ended: a round in flight may still be recorded by a run
    that is stopping) or is still running (e.g. in start-up; a later exit
    is reported as one without a fault, naming this one, and a run with no
    output for --exit_timeout seconds as a hang)."""
    base = progress(self.chaos_root)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
      if not life.running():
        return True
      if progress(self.chaos_root) >= base + 2:
        fault['outcome'] = 'the run went on'
        return False
      time.sleep(0.2)
    fault['outcome'] = f'still running {SETTLE_SECONDS:g}s later'
    return False

  def _hang(self, life: Life, fault: dict) -> None:
    self.hangs += 1
    fault['outcome'] = 'hang'
    self.findings.append(
        f'life {life.index}: neither exited nor trained a round within '
        f'{FLAGS.exit_timeout:g}s after {fault["kind"]}; its tree was killed')
    life.kill_tree()

  def inject(self, kind: str, life: Life) -> bool:
    """Injects `kind` into `life`; returns whether the trainer exited."""
    t0 = time.monotonic()
    fault = dict(kind=kind, life=life.index, round=progress(self.chaos_root),
                 checkpoint=self._checkpoint_round(),
                 at_seconds=round(t0 - self.started, 1))
    self.faults.append(fault)
    before = fault['round']
    print(f'fault {len(self.faults)} at {fault["at_seconds"]}s: {kind} '
          f'(life {life.index}, round {before})', flush=True)
    exited = True
    if kind in ('kill_trainer', 'damage_checkpoint'):
      life.refresh_workers()
      life.process.send_signal(signal.SIGKILL)
      if not life.wait(FLAGS.exit_timeout):
        self._hang(life, fault)
      if kind == 'damage_checkpoint':
        # The life ends before the damage (it judges an earlier one).
        fault['reaction_seconds'] = round(time.monotonic() - t0, 1)
        self._record_exit(life, fault)
        if self._pending_damage is not None:
          self._pending_damage['outcome'] = (
              f'not judged: damaged again (fault {len(self.faults)}) before '
              'a life resumed')
          self._pending_damage = None
        newest = damageable_checkpoint(self.chaos_root)
        if newest:
          info = damage(newest[1], self.rng)
          fault['damage'] = dict(round=newest[0], **info)
          self._pending_damage = dict(round=newest[0], path=newest[1],
                                      damage=info, fault=len(self.faults))
          fault['judged'] = self._pending_damage
        what = fault.get('damage', {})
        print(f'  damaged checkpoint round {what.get("round")}: '
              f'{what.get("file")} {what.get("how")}', flush=True)
        return True
    elif kind == 'term_trainer':
      life.refresh_workers()
      life.process.send_signal(signal.SIGTERM)
      if not life.wait(FLAGS.exit_timeout):
        self._hang(life, fault)
    elif kind == 'kill_worker':
      worker = life.worker()
      fault['worker'] = worker.pid
      _kill(worker)
      if not life.wait(FLAGS.exit_timeout):
        self._hang(life, fault)
    elif kind == 'stop_worker':
      worker = life.worker()
      seconds = round(self.rng.uniform(1, FLAGS.max_stop_seconds), 1)
      fault.update(worker=worker.pid, stop_seconds=seconds)
      try:
        worker.suspend()
      except psutil.NoSuchProcess:
        fault['outcome'] = 'the worker was gone already'
      life.wait(seconds)
      try:
        worker.resume()
      except psutil.NoSuchProcess:
        pass
      exited = self._await_end(life, fault)
    elif kind == 'full_disk':
      seconds = round(self.rng.uniform(1, FLAGS.full_disk_seconds), 1)
      fault['full_seconds'] = seconds
      filler = os.path.join(self.chaos_root, '.chaos_filler')
      try:
        fault['filled_bytes'] = fill(filler)
        life.wait(seconds)
      finally:
        os.remove(filler)
      exited = self._await_end(life, fault)
    fault['reaction_seconds'] = round(time.monotonic() - t0, 1)
    if exited:
      self._record_exit(life, fault)
    else:
      self._last_fault_in_life = (life.index, kind, time.monotonic())
      print(f'  life {life.index}: {fault["outcome"]} after {kind}',
            flush=True)
    return exited

  def run(self) -> str:
    """Runs the command to its end under faults; returns how it ended."""
    os.makedirs(self.log_dir, exist_ok=True)
    self.mount()
    self.started = time.monotonic()
    deadline = self.started + FLAGS.timeout
    next_fault = self.started + self.rng.uniform(FLAGS.min_interval,
                                                 FLAGS.max_interval)
    life = self._start()
    failures_without_fault = 0
    stalled, mark, held_since = 0, -1, None
    finished = None
    while finished is None:
      if life is None:
        life = self._start()
      life.refresh_workers()
      if not life.running():
        record = self._finish(life)
        life = None
        if record['returncode'] == 0:
          finished = 'finished'
          break
        failures_without_fault += 1
        if not record.get('refused_damaged_checkpoint'):  # Reported.
          last = self._last_fault_in_life
          context = (f' ({time.monotonic() - last[2]:.1f}s after {last[1]}, '
                     'which it had seemed to survive)'
                     if last and last[0] == record['index'] else '')
          self.findings.append(
              f'life {record["index"]}: exit {record["returncode"]} without '
              f'a fault{context}: {record["last_line"][:300]}')
        if failures_without_fault >= 3:
          finished = 'stopped: 3 failures in a row without a fault'
        continue
      now = time.monotonic()
      if life.idle_seconds(self.chaos_root) > FLAGS.exit_timeout:
        fault = self.faults[-1] if self.faults and self.faults[-1][
            'life'] == life.index else None
        self.findings.append(
            f'life {life.index}: no output and no round for '
            f'{FLAGS.exit_timeout:g}s (hang'
            f'{", after " + fault["kind"] if fault else ""}); its tree was '
            'killed')
        if fault:
          fault['outcome'] = 'hang'
        self.hangs += 1
        life.kill_tree()
        self._finish(life, fault)
        life = None
        failures_without_fault += 1
        if failures_without_fault >= 3:
          finished = 'stopped: 3 failures in a row without a fault'
        continue
      if now > deadline:
        life.kill_tree()
        self._finish(life)
        finished = f'stopped: --timeout={FLAGS.timeout:g}s passed'
        break
      due = now >= next_fault and (not FLAGS.max_faults
                                   or len(self.faults) < FLAGS.max_faults)
      if due and stalled >= FLAGS.stalled_faults:
        # Livelock guard: hold the fault until the run checkpoints anew.
        if self._checkpoint_round() <= mark:
          if held_since is None:
            held_since = now
            self.deferred += 1
            print(f'  {stalled} faults without a new checkpoint: the next '
                  'waits for one', flush=True)
          due = False
        elif held_since is not None:
          self.deferred_seconds += now - held_since
          held_since = None
      if due:
        kinds = self._applicable(life)
        if kinds:
          checkpoint = self._checkpoint_round()
          stalled = stalled + 1 if checkpoint <= mark else 1
          mark = checkpoint
          kind = self.rng.choice(kinds)
          failures_without_fault = 0
          if self.inject(kind, life):
            record = self.lives[-1]
            life = None
            if record['returncode'] == 0:
              finished = 'finished'
          next_fault = time.monotonic() + self.rng.uniform(
              FLAGS.min_interval, FLAGS.max_interval)
          continue
      time.sleep(0.25)
    self.finished = finished
    self.wall_seconds = round(time.monotonic() - self.started, 1)
    return finished

  def inspect_leftovers(self) -> dict:
    """What the finished chaos run left: checkpoints it set aside, partial
    saves, its lock file, worker logs in its temp folder."""
    out = dict(set_aside_by_run=[], partial_saves=[], lock_left=False,
               worker_logs_left=0, autograph_files_left=0)
    for dirpath, dirnames, _ in os.walk(self.chaos_root):
      if os.path.basename(dirpath) != 'checkpoints':
        continue
      for name in dirnames:
        if re.match(r'program_state_\d+_temp', name):
          out['partial_saves'].append(name)
        elif not CHECKPOINT.match(name):
          out['set_aside_by_run'].append(name)
    if self.finished == 'finished':
      lock = os.path.join(self.chaos_root, '.perfed_tff.lock')
      out['lock_left'] = os.path.exists(lock)
      if out['lock_left']:
        self.findings.append(f'the finished run left its lock file {lock}')
      if out['partial_saves']:
        self.findings.append(f'the finished run left partial checkpoint '
                             f'saves: {out["partial_saves"]}')
    tmp = os.path.join(self.root, 'tmp')
    names = os.listdir(tmp)
    out['worker_logs_left'] = len([n for n in names
                                   if n.startswith('tff_worker_')])
    out['autograph_files_left'] = len([
        n for n in names if n.startswith('__autograph_generated_file')])
    return out

  def abort(self) -> None:
    """Kills the live trainer's tree (an interrupt of this script)."""
    if self._life is not None:
      life = self._life
      life.kill_tree()
      life.close()
      self.lives.append(dict(index=life.index, returncode=life.proc.returncode,
                             fault=None, aborted=True,
                             seconds=round(time.monotonic() - life.started, 1)))
      self._life = None


def fill(path: str) -> int:
  """Fills the filesystem of `path` with one file; returns its size."""
  st = os.statvfs(os.path.dirname(path))
  free = st.f_bavail * st.f_frsize
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  try:
    try:
      os.posix_fallocate(fd, 0, free)
    except OSError:
      pass
    chunk = b'\0' * (1 << 20)
    while True:  # The rest, up to ENOSPC.
      try:
        os.lseek(fd, 0, os.SEEK_END)
        if os.write(fd, chunk[:max(st.f_frsize, 4096)]) <= 0:
          break
      except OSError as e:
        if e.errno == errno.ENOSPC:
          break
        raise
    return os.fstat(fd).st_size
  finally:
    os.close(fd)


# ------------------------------------------------------------- reference

def run_reference(root: str, command: list) -> dict:
  """Runs (or reuses) the uninterrupted run; returns its record."""
  ref_root = os.path.join(root, 'reference')
  record_path = os.path.join(root, 'reference.json')
  try:
    with open(record_path) as f:
      old = json.load(f)
    if (old.get('command') == command and old.get('returncode') == 0
        and result_files(ref_root)):
      print(f'reference: reusing {ref_root} ({old["wall_seconds"]}s)',
            flush=True)
      return dict(old, reused=True)
  except (OSError, ValueError):
    pass
  shutil.rmtree(ref_root, ignore_errors=True)
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  print('reference: ' + ' '.join(shlex.quote(c) for c in command),
        flush=True)
  os.makedirs(os.path.join(root, 'tmp_reference'), exist_ok=True)
  life = Life('reference', command, os.path.join(root, 'logs'),
              os.path.join(root, 'tmp_reference'))
  try:
    life.proc.wait()
  except Interrupted:
    life.kill_tree()
    raise
  finally:
    life.close()
  wall = round(time.monotonic() - life.started, 1)
  text = life.stderr()
  record = dict(command=command, returncode=life.proc.returncode,
                wall_seconds=wall, last_line=_last_line(text)[:400],
                traceback='Traceback' in text)
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=1)
  print(f'reference: exit {record["returncode"]} in {wall}s', flush=True)
  return record


# ---------------------------------------------------------------- report

def summarize(soak: Soak, reference: dict, comparison) -> dict:
  by_kind = collections.Counter(f['kind'] for f in soak.faults)
  codes = collections.Counter(str(l['returncode']) for l in soak.lives)
  outcomes = collections.defaultdict(collections.Counter)
  for f in soak.faults:
    if 'returncode' in f:
      what = f'exit {f["returncode"]}'
      if f.get('error_line'):
        what += ': ' + _shape(f['error_line'].split('error: ', 1)[-1])[:120]
    else:
      what = f.get('outcome', '?')
    if f['kind'] == 'damage_checkpoint':
      judged = f.get('judged') or {}
      what = (f'{f.get("damage", {}).get("file")} '
              f'{f.get("damage", {}).get("how")}: '
              f'{judged.get("outcome", "not resumed yet")}')
    outcomes[f['kind']][what] += 1
  reactions = collections.defaultdict(list)
  for f in soak.faults:
    reactions[f['kind']].append(f['reaction_seconds'])
  for f in soak.faults:  # Not JSON-cyclic: the judged record by value.
    if 'judged' in f:
      f['judged'] = {k: v for k, v in f['judged'].items() if k != 'path'}
  hangs = soak.hangs
  tracebacks = sum(1 for l in soak.lives if l.get('traceback'))
  orphans = sum(len(l.get('leftovers', ())) for l in soak.lives)
  identical = comparison['identical'] if comparison else None
  return dict(
      command=soak.command, seed=FLAGS.seed, rounds=FLAGS.rounds,
      interval_seconds=[FLAGS.min_interval, FLAGS.max_interval],
      fault_kinds=soak.kinds, notes=soak.notes,
      tmpfs_mb=FLAGS.tmpfs_mb if soak.used_tmpfs else None,
      reference=reference, chaos_end=soak.finished,
      chaos_wall_seconds=soak.wall_seconds,
      time_lost_seconds=round(soak.wall_seconds - reference['wall_seconds'],
                              1),
      faults=len(soak.faults), faults_by_kind=dict(by_kind),
      outcomes_by_kind={k: dict(v) for k, v in outcomes.items()},
      reaction_seconds_by_kind={k: [min(v), float(np.median(v)), max(v)]
                                for k, v in reactions.items()},
      lives=len(soak.lives), restarts=max(len(soak.lives) - 1, 0),
      exit_codes=dict(codes), rounds_redone=soak.rounds_redone,
      faults_held_for_a_checkpoint=soak.deferred,
      seconds_held=round(soak.deferred_seconds, 1),
      tracebacks=tracebacks, hangs=hangs, leftover_processes=orphans,
      checkpoints_set_aside_by_soak=soak.manual_set_asides,
      identical=identical, comparison=comparison,
      findings=soak.findings, fault_log=soak.faults, life_log=soak.lives)


def print_table(report: dict) -> None:
  print()
  print(f'{"fault":<18} {"n":>3}  {"reaction s (min/med/max)":<25} outcomes')
  for kind in FAULTS:
    n = report['faults_by_kind'].get(kind, 0)
    if not n and kind not in report['fault_kinds']:
      continue
    r = report['reaction_seconds_by_kind'].get(kind)
    r = '/'.join(f'{x:.1f}' for x in r) if r else '-'
    outs = report['outcomes_by_kind'].get(kind, {})
    first = True
    for what, count in sorted(outs.items(), key=lambda kv: -kv[1]) or [
        ('-', 0)]:
      head = (f'{kind:<18} {n:>3}  {r:<25}' if first else ' ' * 49)
      print(f'{head} {count if count else ""}{"x " if count else ""}{what}')
      first = False
  print()
  ref = report['reference']
  print(f'faults {report["faults"]}, lives {report["lives"]}, restarts '
        f'{report["restarts"]}, exit codes {report["exit_codes"]}')
  print(f'chaos wall {report["chaos_wall_seconds"]}s ({report["chaos_end"]})'
        f', reference {ref["wall_seconds"]}s, time lost '
        f'{report["time_lost_seconds"]}s, rounds trained again '
        f'{report["rounds_redone"]}, faults held for a new checkpoint '
        f'{report["faults_held_for_a_checkpoint"]} '
        f'({report["seconds_held"]}s)')
  comp = report['comparison'] or {}
  if report['identical'] is None:
    print('identical: not compared (the chaos run did not finish)')
  else:
    print(f'identical: {"yes" if report["identical"] else "NO"} '
          f'({len(comp.get("compared", []))} files: '
          f'{", ".join(comp.get("compared", []))})')
    for rel, diff in comp.get('differ', {}).items():
      print(f'  differs: {rel}: {diff}')
    for rel in comp.get('missing', []):
      print(f'  missing in the chaos run: {rel}')
  print(f'tracebacks {report["tracebacks"]}, hangs {report["hangs"]}, '
        f'leftover processes {report["leftover_processes"]}, checkpoints '
        f'set aside by the soak {len(report["checkpoints_set_aside_by_soak"])}')
  left = report.get('run_folder_leftovers', {})
  print(f'checkpoints set aside by the run '
        f'{len(left.get("set_aside_by_run", []))}, partial saves left '
        f'{len(left.get("partial_saves", []))}; left in TMPDIR: '
        f'{left.get("worker_logs_left", 0)} worker logs, '
        f'{left.get("autograph_files_left", 0)} autograph files')
  for note in report['notes']:
    print(f'note: {note}')
  print(f'findings: {len(report["findings"])}')
  for finding in report['findings']:
    print(f'  - {finding}')


def _on_signal(signum, frame):
  del frame
  raise Interrupted(signum)


def prepare_root(root: str) -> None:
  """Creates `root` (marked as a soak's) and clears the last chaos run."""
  os.makedirs(root, exist_ok=True)
  open(os.path.join(root, '.chaos_soak'), 'a').close()
  chaos = os.path.join(root, 'chaos')
  if os.path.ismount(chaos):
    subprocess.run(['umount', '-l', chaos])
  for name in ('chaos', 'logs', 'set_aside', 'chaos_result', 'tmp'):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  os.makedirs(os.path.join(root, 'tmp'))


def main(argv):
  del argv
  train_flags = check_flags()
  root = os.path.abspath(FLAGS.root_output_dir)
  output = os.path.abspath(FLAGS.output or os.path.join(root,
                                                        'chaos_soak.json'))
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, _on_signal)

  def command_for(run_root):
    return [sys.executable, '-m', 'experiments.train', *train_flags,
            f'--rounds={FLAGS.rounds}', f'--root_output_dir={run_root}',
            '--noprogress']

  soak = reference = None
  status = 1
  try:
    prepare_root(root)
    reference = run_reference(root, command_for(os.path.join(root,
                                                             'reference')))
    if reference['returncode'] != 0:
      fail(f'the reference run failed (exit {reference["returncode"]}): '
           f'{reference["last_line"]}', 1)
    soak = Soak(root, command_for, list(dict.fromkeys(FLAGS.faults)),
                random.Random(FLAGS.seed))
    print('chaos: ' + ' '.join(shlex.quote(c) for c in soak.command),
          flush=True)
    end = soak.run()
    leftovers = soak.inspect_leftovers()
    comparison = None
    if end == 'finished':
      comparison = compare_runs(os.path.join(root, 'reference'),
                                soak.chaos_root)
    soak.unmount()
    report = summarize(soak, reference, comparison)
    report['run_folder_leftovers'] = leftovers
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    print_table(report)
    print(f'report: {output}')
    status = 0 if report['identical'] and not report['findings'] else 1
  except Interrupted as e:
    if soak is not None:
      soak.abort()
      soak.finished = f'interrupted by {e}'
      if soak.started is not None:
        soak.wall_seconds = round(time.monotonic() - soak.started, 1)
      try:
        report = summarize(soak, reference, None)
        report['run_folder_leftovers'] = soak.inspect_leftovers()
        with open(output, 'w') as f:
          json.dump(report, f, indent=1, default=str)
      except Exception:  # pylint: disable=broad-except
        pass
      soak.unmount()
    print(f'{PROGRAM}: error: {e} received; the soak was stopped and its '
          'trainer killed', file=sys.stderr, flush=True)
    status = 128 + e.signum
  finally:
    if soak is not None and soak.mounted:
      soak.abort()
      soak.unmount()
  sys.exit(status)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
