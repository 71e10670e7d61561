"""Where a run's metrics go: CSV, TensorBoard, log lines, a progress bar.

`RunReleaseManager` is the one `tff.program.ReleaseManager` a training loop
releases to (TFF's `run_training_process` releases the round's training
metrics and, under `evaluation/`, its evaluation metrics together). It flattens
them and fans out to TFF's `CSVFileReleaseManager`s (`metrics/train.csv`,
`metrics/eval.csv`, keyed by round), `TensorBoardReleaseManager` and one log
line (or a progress bar) per round, and stops the run on a non-finite global
training loss before the round's state is checkpointed.
"""

from __future__ import annotations

import collections
import csv
import math
import os
import sys
from typing import Callable, Mapping, Optional

import numpy as np
import tensorflow_federated as tff

TRAIN_LOSS = 'client_work/train/loss'
PERSONALIZED_LOSS = 'client_work/train/personalized_loss'
EVAL_PREFIX = 'evaluation/'
ROUND_SECONDS = 'training_time_in_seconds'  # tff.simulation's keys
EVAL_TIME_KEY = 'evaluation_time_in_seconds'
_DROPPED = ('round_number',)  # The CSV key already says it.


class NonFiniteLossError(RuntimeError):
  """The global training loss became NaN or infinite."""


def flatten_metrics(structure, prefix: str = '') -> collections.OrderedDict:
  """Nested mappings -> {'a/b/c': python number}; empty leaves dropped."""
  out = collections.OrderedDict()
  if isinstance(structure, Mapping):
    for k, v in structure.items():
      out.update(flatten_metrics(v, f'{prefix}{k}/'))
  elif isinstance(structure, (list, tuple)):
    for i, v in enumerate(structure):
      out.update(flatten_metrics(v, f'{prefix}{i}/'))
  else:
    value = np.asarray(structure)
    if value.size == 1:
      out[prefix.rstrip('/')] = value.item()
  return out


def unflatten_metrics(flat: Mapping[str, object]) -> dict:
  """{'a/b/c': v} -> {'a': {'b': {'c': v}}} (inverse of `flatten_metrics`)."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def read_csv(path: str) -> list[dict]:
  """Rows of a metrics CSV with numbers parsed ([] when missing)."""
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  out = []
  for row in rows:
    parsed = {}
    for k, v in row.items():
      try:
        parsed[k] = int(v) if k == 'round' else float(v)
      except (TypeError, ValueError):
        parsed[k] = v
    out.append(parsed)
  return out


def truncate_csv(path: str, max_round: int, key: str = 'round') -> None:
  """Drops the rows of `path` with `key` > `max_round` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    fieldnames = reader.fieldnames or [key]
    all_rows = list(reader)
  rows = [r for r in all_rows if r.get(key) not in (None, '')
          and int(r[key]) <= max_round]
  if len(rows) == len(all_rows):
    return  # Nothing to drop: the file stays as it is.
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _fmt(v) -> str:
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def progress_bar(total: int, initial: int, desc: str):
  """A tqdm bar on stderr, or None when tqdm (an optional extra) is absent."""
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit='round', desc=desc,
                   file=sys.stderr, dynamic_ncols=True, leave=True)


class RunReleaseManager(tff.program.ReleaseManager):
  """Releases one round's metrics to every output of a run.

  Args:
    label: the run's name in log lines.
    train_csv, eval_csv, tensorboard_dir: output paths (eval_csv may be None).
    write: where log lines go.
    bar: a progress bar (tqdm) or None; with a bar, training rounds update it
      instead of writing a line.
    last_good_checkpoint: fn() -> path of the last checkpoint (for the
      non-finite loss message), or None.
  """

  def __init__(self, label: str, *, train_csv: str, eval_csv: Optional[str],
               tensorboard_dir: str, write: Callable[[str], None], bar=None,
               last_good_checkpoint: Callable[[], Optional[str]] = lambda: None):
    self._label = label
    self._train_csv = tff.program.CSVFileReleaseManager(
        train_csv, save_mode=tff.program.CSVSaveMode.APPEND,
        key_fieldname='round')
    self._eval_csv = None if eval_csv is None else (
        tff.program.CSVFileReleaseManager(
            eval_csv, save_mode=tff.program.CSVSaveMode.APPEND,
            key_fieldname='round'))
    self._tensorboard = tff.program.TensorBoardReleaseManager(tensorboard_dir)
    self._write = write
    self._bar = bar
    self._last_good_checkpoint = last_good_checkpoint

  def _say(self, line: str) -> None:
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    else:
      self._write(line)

  async def release(self, value, key) -> None:
    flat = flatten_metrics(value)
    evaluation = collections.OrderedDict(
        (k[len(EVAL_PREFIX):], v) for k, v in flat.items()
        if k.startswith(EVAL_PREFIX))
    train = collections.OrderedDict(
        (k, v) for k, v in flat.items()
        if not k.startswith(EVAL_PREFIX) and k not in _DROPPED)
    if any(k.startswith('client_work/') for k in train):
      await self._train_csv.release(train, key)
      await self._tensorboard.release({'train': train}, key)
      loss = train.get(TRAIN_LOSS)
      if self._bar is not None:
        self._bar.set_postfix(
            loss='n/a' if loss is None else f'{loss:.4f}', refresh=False)
        self._bar.update(1)
      else:
        self._write(f'{self._label} train round {key}: ' + ' '.join(
            f'{k.rsplit("/", 1)[-1]}={_fmt(train[k])}'
            for k in (TRAIN_LOSS, PERSONALIZED_LOSS,
                      'client_work/train/num_non_finite_updates',
                      'finalizer/update_non_finite', ROUND_SECONDS)
            if k in train))
      if loss is not None and not math.isfinite(loss):
        path = self._last_good_checkpoint()
        where = (f'the last good checkpoint is {path}' if path
                 else 'no checkpoint was saved')
        raise NonFiniteLossError(
            f'{self._label}: the global training loss is {loss} at round '
            f'{key}; stopping ({where}). Try a smaller --beta/--alpha.')
    if evaluation and self._eval_csv is not None:
      await self._eval_csv.release(evaluation, key)
      await self._tensorboard.release({'eval': evaluation}, key)
      self._say(f'{self._label} eval round {key}: ' + ' '.join(
          f'{k}={_fmt(evaluation[k])}' for k in (
              'seen/step_0/accuracy_mean', 'seen/step_1/accuracy_mean',
              'unseen/step_1/accuracy_mean') if k in evaluation))


def save_model_weights(path: str, model_weights, round_num: int) -> str:
  """Writes `trainable_i`, `non_trainable_i` and `round` to an .npz
  (atomically)."""
  arrays = {f'trainable_{i}': np.asarray(w)
            for i, w in enumerate(model_weights.trainable)}
  arrays.update({f'non_trainable_{i}': np.asarray(w)
                 for i, w in enumerate(model_weights.non_trainable)})
  arrays['round'] = np.int64(round_num)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load_model_weights(path: str) -> dict:
  """The arrays of a `save_model_weights` file, by name."""
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def read_model_weights(path: str) -> tff.learning.models.ModelWeights:
  """A `save_model_weights` file as `tff.learning.models.ModelWeights`."""
  arrays = load_model_weights(path)

  def part(name):
    n = sum(1 for k in arrays if k.startswith(f'{name}_'))
    return [arrays[f'{name}_{i}'] for i in range(n)]

  return tff.learning.models.ModelWeights(part('trainable'),
                                          part('non_trainable'))
