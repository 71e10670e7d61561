"""A run's output folder: its paths, its settings files, and its lock.

`<root_output_dir>/[<experiment_name>/]<algorithm>/` holds `config.json` and
`hparams.csv` (the run's settings), `checkpoints/`, `metrics/train.csv` and
`metrics/eval.csv`, `tensorboard/` and `final_model.npz`.
`OutputDirLock` holds `root_output_dir` for one run (or comparison) at a
time.
"""

from __future__ import annotations

import collections
import csv
import errno
import fcntl
import json
import os
import re
import socket
import stat
import sys
import time
from typing import Callable, Optional

from perfed_tff import checks
from perfed_tff.program import checkpointing

LOCK_NAME = '.perfed_tff.lock'
SETTINGS_FILES = ('config', 'hparams')


def output_paths(config) -> collections.OrderedDict:
  """The paths of everything a run of `config` (a `TrainingConfig`)
  writes."""
  run_dir = config.run_dir
  return collections.OrderedDict(
      run_dir=run_dir,
      checkpoints=os.path.join(run_dir, 'checkpoints'),
      train_csv=os.path.join(run_dir, 'metrics', 'train.csv'),
      eval_csv=os.path.join(run_dir, 'metrics', 'eval.csv'),
      tensorboard=os.path.join(run_dir, 'tensorboard'),
      final_model=os.path.join(run_dir, 'final_model.npz'),
      config=os.path.join(run_dir, 'config.json'),
      hparams=os.path.join(run_dir, 'hparams.csv'),
  )


def _unreadable(path: str, kind: str) -> Optional[str]:
  """Why the settings file `path` (of `kind` 'config' or 'hparams') is no
  such file, or None when it is absent or reads as one."""
  try:
    with open(path, newline='') as f:
      if kind == 'config':
        if not isinstance(json.load(f), dict):
          return 'not a JSON object'
      else:
        rows = list(csv.reader(f))
        if len(rows) != 2 or len(rows[0]) != len(rows[1]):
          return 'not a header and one row'
  except FileNotFoundError:
    return None
  except (OSError, ValueError, csv.Error) as e:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__
  return None


def write_settings(config, paths,
                   write: Optional[Callable[[str], None]] = None) -> None:
  """The run's settings beside its metrics: `config.json` (the config) and
  `hparams.csv` (a header and one row: every setting, flat, as TFF research
  binaries write it; `TrainingConfig.to_hparams`). A file there that is no
  such file (damaged, or written by something else) is replaced with one
  warning line through `write`, as a damaged checkpoint is set aside."""
  for kind in SETTINGS_FILES:
    why = _unreadable(paths[kind], kind)
    if why is not None and write is not None:
      write(f'warning: {paths[kind]} was unreadable ({why}); rewritten with '
            "this run's settings")
  with open(paths['config'], 'w') as f:
    json.dump(config.to_json(), f, indent=1, sort_keys=True)
  row = config.to_hparams()
  with open(paths['hparams'], 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)


def has_checkpoint(config) -> bool:
  """Whether the run of `config` has a checkpoint to resume from."""
  try:
    names = os.listdir(output_paths(config)['checkpoints'])
  except OSError:
    return False
  pattern = re.compile(re.escape(checkpointing.PREFIX) + r'\d+')
  return any(pattern.fullmatch(name) for name in names)


def check_output_paths(config) -> None:
  """Every folder of the run's outputs is a folder (or absent) and every
  file is a file (or absent).

  Raises:
    checks.ArgumentError (root_output_dir): something else is in the way.
  """
  run_dir = config.run_dir
  folders = ([os.path.dirname(run_dir)] if config.experiment_name else []) + [
      run_dir] + [os.path.join(run_dir, d) for d in
                  ('metrics', 'checkpoints', 'tensorboard')]
  files = [os.path.join(run_dir, f) for f in
           ('config.json', 'hparams.csv', 'final_model.npz',
            os.path.join('metrics', 'train.csv'),
            os.path.join('metrics', 'eval.csv'))]
  expected = ([(p, os.path.isdir, 'is not a directory (the run needs a '
                'directory there)') for p in folders]
              + [(p, os.path.isfile, 'is not a regular file (the run writes '
                  'a file there)') for p in files])
  for path, is_kind, what in expected:
    if os.path.lexists(path) and not is_kind(path):
      raise checks.ArgumentError(
          'root_output_dir', f'{path} exists and {what}; move it away or '
          'choose another `root_output_dir`')


class OutputDirLock:
  """An exclusive lock on an output directory, held while a run writes there.

  `<directory>/.perfed_tff.lock` is `flock`ed (the kernel drops the lock
  when its process dies, even by SIGKILL) and holds the owner's pid, host,
  command and start time; it is removed on release. A file left by a killed
  run is taken over (`previous_owner` is its record). Re-entrant within a process (a comparison locks
  the directory, then each of its runs does again).

  Raises (on enter):
    checks.ArgumentError (root_output_dir): another live process holds it.
  """

  _held: dict = {}  # path -> [fd, depth]

  def __init__(self, directory: str, name: str = 'root_output_dir'):
    self.directory = os.path.abspath(directory)
    self.path = os.path.join(self.directory, LOCK_NAME)
    self.name = name
    self.previous_owner: Optional[dict] = None

  def __enter__(self) -> 'OutputDirLock':
    held = self._held.get(self.path)
    if held is not None:
      held[1] += 1
      return self
    os.makedirs(self.directory, exist_ok=True)
    while True:
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        owner = _read_owner(fd)
        os.close(fd)
        who = (f'pid {owner.get("pid")} on {owner.get("host")}, '
               f'{owner.get("command", "?")}, since '
               f'{owner.get("started", "?")}' if owner else 'another process')
        raise checks.ArgumentError(
            self.name, f'{self.directory} is in use by a running run ({who}); '
            'wait for it to finish or choose another directory') from None
      try:  # The file may have been removed by its last owner meanwhile.
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    self.previous_owner = _read_owner(fd) or None  # A killed run's, if any.
    record = dict(pid=os.getpid(), host=socket.gethostname(),
                  command=' '.join([os.path.basename(sys.argv[0] or 'python')]
                                   + sys.argv[1:])[:300],
                  started=time.strftime('%Y-%m-%d %H:%M:%S'))
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
    except OSError as e:  # E.g. a full disk: no empty lock file left behind.
      try:
        os.unlink(self.path)
      except OSError:
        pass
      os.close(fd)
      raise OSError(e.errno, e.strerror, self.path) from None
    self._held[self.path] = [fd, 1]
    return self

  def _open(self) -> int:
    """The lock file, opened (created when missing).

    Raises:
      checks.ArgumentError: something that is no lock file (a directory, a
        FIFO, ...) or an unwritable file is in its place; rerunning cannot
        help, so the message says what to remove.
    """
    remove = ('it is not the lock file this program keeps there; move it '
              'away or remove it, then rerun')
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
      raise checks.ArgumentError(
          self.name, f'{self.path} is a directory: {remove}') from None
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EPERM):
        raise checks.ArgumentError(
            self.name, f'cannot open the lock file {self.path} '
            f'({e.strerror}); make it writable or remove it') from None
      if e.errno in (errno.ENXIO, errno.ELOOP, errno.ENODEV):
        raise checks.ArgumentError(
            self.name, f'{self.path} is not a regular file: {remove}'
        ) from None
      raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      os.close(fd)
      raise checks.ArgumentError(
          self.name, f'{self.path} is not a regular file: {remove}')
    return fd

  def __exit__(self, *exc_info) -> None:
    held = self._held.get(self.path)
    if held is None:
      return
    held[1] -= 1
    if held[1] == 0:
      del self._held[self.path]
      try:
        os.unlink(self.path)  # Still locked: no one else holds this file.
      except OSError:
        pass
      os.close(held[0])  # Releases the flock.


def _read_owner(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}
