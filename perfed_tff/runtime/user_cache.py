"""This user's cache folder for the runtime: `$XDG_CACHE_HOME/perfed_tff`
(default `~/.cache/perfed_tff`).

What is kept there is run (a preloaded library, compiled computations), so
a folder or file is used only when it is this user's own and nobody else can
write to it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Optional

from absl import logging


def base_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'perfed_tff')


def is_private(path: str) -> bool:
  """Whether `path` is ours (not a link) and writable by nobody else."""
  try:
    info = os.lstat(path)
  except OSError:
    return False
  return (info.st_uid == os.geteuid() and not stat.S_ISLNK(info.st_mode)
          and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def usable_dir(path: str) -> bool:
  """Creates `path` (mode 0700) if needed; whether it is private and
  writable."""
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
  except OSError:
    return False
  return is_private(path) and os.access(path, os.W_OK | os.X_OK)


# The computations kept across runs (`compiled_cache`,
# `perfed_tff.accelerator.computation_cache`): a folder, or 'off'.
COMPUTATIONS_ENV = 'PERFED_TFF_COMPUTATION_CACHE'
MAX_BYTES = 512 * 1024 * 1024  # per kind of computation


def computations_dir(kind: str) -> Optional[str]:
  """The private folder of computations of `kind` ('compiled', 'traced'):
  `<base_dir()>/computations/<kind>`, or under `$PERFED_TFF_COMPUTATION_CACHE`;
  None when that is 'off' or the folder is not private."""
  root = os.environ.get(COMPUTATIONS_ENV)
  if root == 'off':
    return None
  path = os.path.join(root or os.path.join(base_dir(), 'computations'), kind)
  return path if usable_dir(path) and usable_dir(os.path.dirname(path)) else None


def prune(directory: str, *, suffix: str, max_bytes: int = MAX_BYTES) -> None:
  """Removes the least recently used `*suffix` files of `directory` beyond
  `max_bytes` in all."""
  entries = []
  for name in os.listdir(directory):
    if not name.endswith(suffix):
      continue
    try:
      info = os.stat(os.path.join(directory, name))
    except OSError:
      continue
    entries.append((info.st_mtime, info.st_size, name))
  total = sum(size for _, size, _ in entries)
  for _, size, name in sorted(entries):
    if total <= max_bytes:
      break
    try:
      os.remove(os.path.join(directory, name))
      total -= size
    except OSError:
      pass


def read_entry(path: str) -> Optional[bytes]:
  """The bytes of the cache entry `path` (and marks it used), or None: no
  such entry, or one that is not private."""
  if not is_private(path):
    return None
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None
  try:
    os.utime(path)  # Recently used: pruned last.
  except OSError:
    pass
  return data


def write_entry(path: str, chunks, *, suffix: str) -> bool:
  """Writes `chunks` (bytes) as the cache entry `path`, atomically, then
  prunes its folder (`prune`). False when the disk refused (full,
  read-only): the caller simply goes without the entry."""
  directory = os.path.dirname(path)
  try:
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', dir=directory)
    try:
      with os.fdopen(fd, 'wb') as f:
        for chunk in chunks:
          f.write(chunk)
      os.replace(tmp, path)
    except BaseException:
      try:
        os.remove(tmp)
      except OSError:
        pass
      raise
  except OSError as e:
    logging.info('cache entry %s not written (%s)', path, e)
    return False
  prune(directory, suffix=suffix)
  return True
