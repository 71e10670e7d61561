"""Checkpoints of a training run: a `tff.program.FileProgramStateManager`.

`CheckpointManager` is a `tff.program.ProgramStateManager`, so any TFF loop
(`tff.simulation.run_training_process`, `tff.learning.programs.train_model`)
can save and resume with it; `version` is the last completed round.

A checkpoint (one SavedModel directory `program_state_<round>`, written to a
temporary directory and renamed, so a kill never leaves half of one) holds

* the last completed round,
* JSON with the run's settings that must not change on resume
  and the shapes/dtypes of every state tensor,
* the flattened `LearningProcess` state (model weights, optimizer
  and aggregator state): everything needed to continue, since client sampling
  and batch shuffling are pure functions of (seed, round).

Loading checks the metadata against the current run and the leaves against
the freshly initialized state; a corrupt or incompatible checkpoint raises
`CheckpointError` and is left untouched (it is never overwritten: rounds only
move forward and the state manager refuses to write an existing version).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.program import file_utils
import tree

from perfed_tff.runtime import supervision

PREFIX = 'program_state_'
LOCK_NAME = '.perfed_tff.lock'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used for this run."""


def leaf_specs(state) -> list[list]:
  """[[shape, dtype], ...] of the flattened `state`."""
  return [[list(np.shape(x)), np.asarray(x).dtype.name]
          for x in tree.flatten(state)]


class CheckpointManager(tff.program.FileProgramStateManager):
  """Saves and restores a `LearningProcess` state, version = round.

  On top of `tff.program.FileProgramStateManager` (which cannot save a raw
  LearningProcess state in TFF 0.87, so the state is flattened here), every
  checkpoint records `metadata` (the run's settings that must not change on
  resume) and the shapes/dtypes of the state tensors; `load` checks both and
  raises `CheckpointError` (leaving the checkpoint untouched) on a mismatch
  or a corrupt file.

  Args:
    root_dir: directory of the checkpoints (created when missing).
    metadata: JSON-able settings of this run.
    keep_total: how many of the latest checkpoints to keep.
  """

  def __init__(self, root_dir: str, *, metadata: Mapping[str, Any],
               keep_total: int = 3):
    super().__init__(root_dir, prefix=PREFIX, keep_total=keep_total,
                     keep_first=False)
    self.root_dir = root_dir
    self.metadata = json.loads(json.dumps(dict(metadata), sort_keys=True))
    self._remove_partial_saves()

  def _remove_partial_saves(self) -> None:
    """Deletes `program_state_<n>_temp<k>` directories: saves cut short by a
    kill (the state manager renames a finished save into place)."""
    pattern = re.compile(re.escape(PREFIX) + r'\d+_temp\d+$')
    for name in os.listdir(self.root_dir):
      if pattern.match(name):
        shutil.rmtree(os.path.join(self.root_dir, name), ignore_errors=True)

  def latest_round(self) -> Optional[int]:
    versions = supervision.run_sync(self.get_versions())
    return max(versions) if versions else None

  def path(self, round_num: int) -> str:
    return os.path.join(self.root_dir, f'{PREFIX}{round_num}')

  async def save(self, program_state, version: int) -> None:
    metadata = dict(self.metadata, state_leaves=leaf_specs(program_state))
    # A list: TF 2.14's SavedModel cannot trace dict/tuple wrappers here.
    flat = [np.int64(version), json.dumps(metadata, sort_keys=True),
            [np.asarray(x) for x in tree.flatten(program_state)]]
    try:
      await super().save(flat, version)
    except BaseException:
      # A full disk or an interrupt: no half-written `_temp` directory stays.
      self._remove_partial_saves()
      raise

  async def load(self, version: int, structure):
    """The state saved at round `version`, shaped like `structure`.

    Raises:
      tff.program.ProgramStateNotFoundError: no such checkpoint.
      CheckpointError: the checkpoint cannot be read or belongs to a
        different run (other settings or model).
    """
    path = self.path(version)
    if not os.path.isdir(path):
      raise tff.program.ProgramStateNotFoundError(version)
    hint = ('it was left untouched; move it away or choose another '
            '`root_output_dir`')
    try:
      # The saved structure is needed up front by the parent's `load`; the
      # number of leaves is only checked below, with a clearer message.
      saved_round, raw, saved_leaves = await file_utils.read_saved_model(path)
      raw = raw.numpy() if hasattr(raw, 'numpy') else raw
      saved_round = int(np.asarray(saved_round))
      saved_meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
      leaves = [np.asarray(x.numpy() if hasattr(x, 'numpy') else x)
                for x in saved_leaves]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {path} is corrupt or unreadable '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); '
          f'{hint}.') from e
    if saved_round != version:
      raise CheckpointError(f'checkpoint {path} says it is round '
                            f'{saved_round}; {hint}.')
    mismatched = [
        f'{k}={saved_meta.get(k)!r} (this run: {v!r})'
        for k, v in self.metadata.items() if saved_meta.get(k) != v]
    if mismatched:
      raise CheckpointError(
          f'checkpoint {path} was written by a different run: '
          f'{", ".join(mismatched)}; {hint}.')
    want = leaf_specs(structure)
    got = [[list(x.shape), x.dtype.name] for x in leaves]
    if want != got:
      raise CheckpointError(
          f'checkpoint {path} does not fit this model: its state tensors are '
          f'{_describe(got)}, this model needs {_describe(want)}; {hint}.')
    return tree.unflatten_as(structure, leaves)


def _describe(specs) -> str:
  return '[' + ', '.join(f'{d}{tuple(s)}' for s, d in specs) + ']'


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
    from perfed_tff import checks  # pylint: disable=g-import-not-at-top
    os.makedirs(self.directory, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
    self._held[self.path] = [fd, 1]
    return self

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
