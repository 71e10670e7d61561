"""The faults of a chaos soak and the processes they hit.

A life of the training command (`Life`: one process group of its own, its
stdout/stderr in files, its local `worker_binary` children tracked) is
killed, stopped and watched here; a fault that is no signal damages the
newest checkpoint (`damage`: a flipped byte, a truncated or deleted file) or
fills the run's disk (`fill`). `progress` and `checkpoints` read how far a
run has come from its files. The schedule of the faults and the judging of
their outcomes are `chaos_soak_lib`'s.
"""

from __future__ import annotations

import csv
import errno
import glob
import os
import random
import re
import signal
import subprocess
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAULTS = ('kill_trainer', 'term_trainer', 'stop_worker', 'kill_worker',
          'full_disk', 'damage_checkpoint')
# (file under the checkpoint folder, how) for `damage_checkpoint`.
DAMAGES = (('variables/variables.data-*', 'flip'),
           ('variables/variables.data-*', 'truncate'),
           ('variables/variables.index', 'delete'),
           ('variables/variables.index', 'truncate'),
           ('saved_model.pb', 'truncate'),
           ('saved_model.pb', 'flip'))
CHECKPOINT = re.compile(r'program_state_(\d+)$')


# ------------------------------------------------------------- processes

def is_alive(p: psutil.Process) -> bool:
  try:
    return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def kill(p: psutil.Process) -> None:
  try:
    p.kill()
    p.send_signal(signal.SIGCONT)  # A stopped process dies too.
  except psutil.NoSuchProcess:
    pass


def wait_gone(procs, timeout: float) -> list:
  deadline = time.monotonic() + timeout
  alive = list(procs)
  while alive and time.monotonic() < deadline:
    alive = [p for p in alive if is_alive(p)]
    if alive:
      time.sleep(0.1)
  return alive


def group_members(pgid: int) -> list:
  out = []
  for p in psutil.process_iter(['pid']):
    try:
      if p.pid != os.getpid() and os.getpgid(p.pid) == pgid and is_alive(p):
        out.append(p)
    except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
      pass
  return out


def last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ''


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
    alive = [p for p in self.workers.values() if is_alive(p)]
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
    left = [p for p in group_members(self.proc.pid) if p.pid != self.proc.pid]
    left += [p for p in self.workers.values() if is_alive(p)]
    if self.running():
      kill(self.process)
    for p in left:
      kill(p)
    self.proc.wait()
    wait_gone(left, 10)
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
