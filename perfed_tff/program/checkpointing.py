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

Beside them, a manifest (`perfed_tff_manifest.json`, written after the data)
lists each file's size and SHA-256 (`checkpoint_files`).

Loading checks the files against the manifest, the metadata against the
current run and the leaves against the freshly initialized state. A
checkpoint of another run (other settings or shapes) raises `CheckpointError`
and is left untouched (it is never overwritten: rounds only move forward and
the state manager refuses to write an existing version). A damaged one
(truncated, a flipped bit, a missing part, an empty folder) raises
`CheckpointDamagedError`; resuming (`load_latest`) then takes the newest
intact checkpoint and renames the damaged newer ones aside
(`program_state_<round>.damaged-<time>`, never deleted), with one warning
line. When none is intact, nothing is renamed and `CheckpointError` says so:
a long run is not restarted from round 0 on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tree

from perfed_tff.program import checkpoint_files
from perfed_tff.program import event_loop

PREFIX = 'program_state_'
CheckpointError = checkpoint_files.CheckpointError


class CheckpointDamagedError(CheckpointError):
  """A checkpoint that cannot be read: truncated or changed files (a wrong
  size or checksum), a missing part, an empty folder, a SavedModel that
  TensorFlow cannot parse. Not raised for a readable checkpoint of another
  run (a plain `CheckpointError`).

  Attributes:
    version: its round.
    path: its folder.
    reason: what is wrong, e.g. 'missing part: variables/variables.index'.
  """

  def __init__(self, version: int, path: str, reason: str, hint: str):
    self.version, self.path, self.reason = version, path, reason
    super().__init__(f'checkpoint {path} is corrupt or unreadable '
                     f'({reason}); {hint}.')


def leaf_specs(state) -> list[list]:
  """[[shape, dtype], ...] of the flattened `state`."""
  return [[list(np.shape(x)), np.asarray(x).dtype.name]
          for x in tree.flatten(state)]


class CheckpointManager(tff.program.FileProgramStateManager):
  """Saves and restores a `LearningProcess` state, version = round.

  On top of `tff.program.FileProgramStateManager` (which cannot save a raw
  LearningProcess state in TFF 0.87, so the state is flattened here; the
  program state of `tff.learning.programs.train_model`, with its data
  iterator and timestamp, is stored as arrays: `flatten_train_model_state`),
  every
  checkpoint records `metadata` (the run's settings that must not change on
  resume) and the shapes/dtypes of the state tensors, and a manifest of its
  files' sizes and checksums (`checkpoint_files`); `load` checks all three and
  raises `CheckpointError` (leaving the checkpoint untouched) on a mismatch
  or `CheckpointDamagedError` on a damaged file. `load_latest` resumes from
  the newest intact checkpoint, setting newer damaged ones aside.

  Args:
    root_dir: directory of the checkpoints (created when missing).
    metadata: JSON-able settings of this run.
    keep_total: how many of the latest checkpoints to keep (checkpoints set
      aside as damaged are no versions: never counted, never deleted).
    write: where `load_latest`'s warning line goes (default: absl's
      `logging.warning`).
  """

  def __init__(self, root_dir: str, *, metadata: Mapping[str, Any],
               keep_total: int = 3,
               write: Optional[Callable[[str], None]] = None):
    super().__init__(root_dir, prefix=PREFIX, keep_total=keep_total,
                     keep_first=False)
    self.root_dir = root_dir
    self._write = write or logging.warning
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
    versions = event_loop.run_sync(self.get_versions())
    return max(versions) if versions else None

  def path(self, round_num: int) -> str:
    return os.path.join(self.root_dir, f'{PREFIX}{round_num}')

  async def save(self, program_state, version: int) -> None:
    if isinstance(program_state, tff.learning.programs.ProgramState):
      program_state = flatten_train_model_state(program_state)
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
    # After the data, atomically: killed before it, the checkpoint is one
    # without a manifest (as older ones), checked by TensorFlow's reading.
    checkpoint_files.write_manifest(self.path(version))

  async def load(self, version: int, structure):
    """The state saved at round `version`, shaped like `structure`
    (train_model's `ProgramState` too, its data iterator rebuilt from the
    one in `structure`).

    Raises:
      tff.program.ProgramStateNotFoundError: no such checkpoint.
      CheckpointDamagedError: the checkpoint is damaged
        (`checkpoint_files.check_files`, or TensorFlow cannot read it).
      CheckpointError: the checkpoint belongs to a different run (other
        settings or model), or its files cannot be opened (permissions).
    """
    if isinstance(structure, tff.learning.programs.ProgramState):
      flat = await self.load(version, flatten_train_model_state(structure))
      return restore_train_model_state(flat, structure)
    path = self.path(version)
    if not os.path.lexists(path):
      raise tff.program.ProgramStateNotFoundError(version)
    hint = ('it was left untouched; move it away or choose another '
            '`root_output_dir`')
    damage = checkpoint_files.check_files(path)
    if damage:
      raise CheckpointDamagedError(version, path, damage, hint)
    try:
      # The saved structure is needed up front by the parent's `load`; the
      # number of leaves is only checked below, with a clearer message.
      saved_round, raw, saved_leaves = await asyncio.to_thread(
          _read_saved_model, path)
      raw = raw.numpy() if hasattr(raw, 'numpy') else raw
      saved_round = int(np.asarray(saved_round))
      saved_meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
      leaves = [np.asarray(x.numpy() if hasattr(x, 'numpy') else x)
                for x in saved_leaves]
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ == 'PermissionDeniedError':
        raise CheckpointError(  # Not damage: nothing to set aside.
            f'cannot read checkpoint {path} ({_short(e)}); make it readable '
            'and rerun') from e
      raise CheckpointDamagedError(
          version, path, f'{type(e).__name__}: {_short(e)}', hint) from e
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

  async def load_latest(self, structure):
    """(state, round) of the newest intact checkpoint of this run; (None, 0)
    when there is none at all.

    A newer checkpoint that is damaged (`CheckpointDamagedError`: truncated,
    a flipped bit, a missing part, an empty folder) is skipped; once an
    intact one is found, each skipped one is set aside (renamed
    `<name>.damaged-<time>`, never deleted; no longer a version, so
    `keep_total` neither counts nor deletes it) and one warning line
    through `write` names them, why, and the round resumed.

    Raises:
      CheckpointError: a checkpoint of another run (other settings or model)
        is met before an intact one (the existing message); no checkpoint is
        intact (a long run is not restarted from round 0 on its own); or a
        damaged one cannot be renamed. Nothing is renamed then.
    """
    versions = await self.get_versions()
    if not versions:
      return None, 0
    damaged = []
    for version in sorted(versions, reverse=True):
      try:
        state = await self.load(version, structure)
      except CheckpointDamagedError as e:
        damaged.append(e)
        continue
      except tff.program.ProgramStateNotFoundError:
        continue  # Removed meanwhile.
      if damaged:
        self._write(self._set_aside(damaged, version))
      return state, version
    if not damaged:
      return None, 0
    listed = '; '.join(f'round {e.version}: {e.reason}' for e in damaged)
    raise CheckpointError(
        f'no intact checkpoint to resume in {self.root_dir} ({listed}); '
        'nothing was changed. A run is not started over from round 0 on its '
        'own: to start over, move that folder away (or choose another '
        '`root_output_dir`), then rerun.')

  def _set_aside(self, damaged: list, resumed: int) -> str:
    """Renames the checkpoints of `damaged` (CheckpointDamagedErrors) aside;
    returns the warning line.

    Raises:
      CheckpointError: one cannot be renamed (it would stay the latest
        version, and the next save of its round would fail).
    """
    names = []
    for e in damaged:
      try:
        names.append(os.path.basename(
            checkpoint_files.set_aside(e.path)))
      except OSError as error:
        raise CheckpointError(
            f'checkpoint {e.path} is unreadable ({e.reason}) and cannot be '
            f'set aside ({error.strerror or error}); move it away, then '
            'rerun to resume from round '
            f'{resumed}') from None
    if len(damaged) == 1:
      what = (f'checkpoint round {damaged[0].version} ({damaged[0].path}) is '
              f'unreadable ({damaged[0].reason})')
    else:
      what = (f'checkpoints of rounds '
              f'{", ".join(str(e.version) for e in damaged)} in '
              f'{self.root_dir} are unreadable ('
              + '; '.join(f'round {e.version}: {e.reason}' for e in damaged)
              + ')')
    return (f'warning: {what}; set aside as {", ".join(names)}; resuming '
            f'from round {resumed}')


def _describe(specs) -> str:
  return '[' + ', '.join(f'{d}{tuple(s)}' for s, d in specs) + ']'


def _short(error: BaseException) -> str:
  """The first line of `error`'s message, without TensorFlow's
  `{{function_node ...}}` prefix, at most 200 characters."""
  lines = [l for l in str(error).splitlines() if l.strip()]
  line = re.sub(r'\{\{[^}]*\}\}\s*', '', lines[0] if lines else '').strip()
  return (line or type(error).__name__)[:200]


def _read_saved_model(path: str):
  """The values a `FileProgramStateManager` saved at `path` (a SavedModel
  whose call returns them; variables read)."""
  value = tf.saved_model.load(path)()
  return tf.nest.map_structure(
      lambda v: v.read_value() if isinstance(v, tf.Variable) else v, value)


def flatten_train_model_state(program_state) -> list:
  """`tff.learning.programs.train_model`'s `ProgramState(state,
  round_number, next_evaluation_timestamp_seconds, data_iterator)` as
  arrays: `[state, round_number, timestamp or -1, iterator bytes as uint8]`
  (no iterator: no bytes)."""
  state, round_number, timestamp, iterator = program_state
  raw = b'' if iterator is None else iterator.to_bytes()
  return [state, np.int64(round_number),
          np.float64(-1.0 if timestamp is None else timestamp),
          np.frombuffer(raw, np.uint8).copy()]


def restore_train_model_state(flat, structure):
  """The `ProgramState` shaped like `structure` of its
  `flatten_train_model_state` arrays `flat`. The data iterator is rebuilt
  by the iterator in `structure`: its `restored(buffer)` where it has one
  (`round_data.RoundDataIterator`, whose source is not in its bytes), else
  its class's `from_bytes`."""
  state, round_number, timestamp, raw = flat
  template = structure[3]
  buffer = np.asarray(raw, np.uint8).tobytes()
  if template is None:
    iterator = None
  elif hasattr(template, 'restored'):
    iterator = template.restored(buffer)
  else:
    iterator = type(template).from_bytes(buffer)
  timestamp = float(timestamp)
  return type(structure)(state, int(round_number),
                         None if timestamp < 0 else timestamp, iterator)
