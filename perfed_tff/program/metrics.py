"""Where a run's metrics go: CSV, TensorBoard, log lines, a progress bar.

`RunReleaseManager` is the one `tff.program.ReleaseManager` a training loop
releases to (TFF's `run_training_process` releases the round's training
metrics and, under `evaluation/`, its evaluation metrics together). It flattens
them and fans out to TFF's `CSVFileReleaseManager`s (`metrics/train.csv`,
`metrics/eval.csv`, keyed by round), TensorBoard (`TensorBoardWriter`: what
TFF's `TensorBoardReleaseManager` writes, flushed at every round) and one log
line (or a progress bar) per round. It only releases: whether a run has
diverged is decided by the loop (`perfed_tff.program.divergence`).
"""

from __future__ import annotations

import collections
import csv
import os
import re
import sys
from typing import Callable, Mapping, Optional

import numpy as np
import tensorflow_federated as tff

from perfed_tff.program import divergence

TRAIN_LOSS = divergence.TRAIN_LOSS
PERSONALIZED_LOSS = divergence.PERSONALIZED_LOSS
NUM_NON_FINITE = divergence.NUM_NON_FINITE
NUM_WITHOUT_STEP = divergence.NUM_WITHOUT_STEP
EVAL_PREFIX = 'evaluation/'
ROUND_SECONDS = 'training_time_in_seconds'  # tff.simulation's keys
EVAL_TIME_KEY = 'evaluation_time_in_seconds'
_DROPPED = ('round_number',)  # The CSV key already says it.
# 'seen/step_5/accuracy_mean' -> ('seen', '5').
_EVAL_ACCURACY = re.compile(r'(.+)/step_(\d+)/accuracy_mean')


class MetricsFileError(ValueError):
  """An existing metrics CSV cannot be read (a garbage row, ...)."""


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


def _round_of(path: str, line: int, row: dict, key: str) -> int:
  value = row.get(key)
  try:
    if None in row:  # More cells than the header has names.
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise MetricsFileError(
        f'{path} line {line} is not a metrics row ({key}={value!r})') from None


def truncate_csv(path: str, max_round: int, key: str = 'round') -> None:
  """Drops the rows of `path` with `key` > `max_round` (atomically).

  Raises:
    MetricsFileError: `path` exists but is no metrics CSV (a directory, a
      garbage row, no `key` column); it is left as it is.
  """
  if not os.path.lexists(path):
    return
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      fieldnames = reader.fieldnames or [key]
      all_rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise MetricsFileError(f'{path} cannot be read '
                           f'({type(e).__name__}: {e})') from None
  if all_rows and key not in fieldnames:
    raise MetricsFileError(f'{path} has no {key!r} column')
  rows = [r for i, r in enumerate(all_rows, start=2)
          if _round_of(path, i, r, key) <= max_round]
  if len(rows) == len(all_rows):
    return  # Nothing to drop: the file stays as it is.
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=fieldnames)
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, path)
  finally:
    _remove(tmp)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def prune_tensorboard(log_dir: str, max_step: int) -> int:
  """Drops the summaries with step > `max_step` (and a record cut short by a
  kill) from the event files under `log_dir`, so a resumed run that trains
  those rounds again logs each step once. Returns how many were dropped."""
  if not os.path.isdir(log_dir):
    return 0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  dropped = 0
  for root, _, names in os.walk(log_dir):
    for name in names:
      if '.tfevents.' not in name or '.tmp' in name:
        continue
      path = os.path.join(root, name)
      kept, drop, cut = [], 0, False
      try:
        for record in tf.data.TFRecordDataset(path):
          raw = record.numpy()
          event = event_pb2.Event.FromString(raw)
          if event.HasField('summary') and event.step > max_step:
            drop += 1
          else:
            kept.append(raw)
      except (tf.errors.DataLossError, tf.errors.OutOfRangeError):
        cut = True
      if not drop and not cut:
        continue
      tmp = f'{path}.tmp{os.getpid()}'
      try:
        with tf.io.TFRecordWriter(tmp) as writer:
          for raw in kept:
            writer.write(raw)
        os.replace(tmp, path)
      finally:
        _remove(tmp)
      dropped += drop
  return dropped


class TensorBoardWriter:
  """The summaries TFF's `tff.program.TensorBoardReleaseManager` writes
  (a scalar per numeric scalar, a histogram per numeric array, named by
  their '/'-joined keys, non-numeric values left out), flushed after every
  write: TFF's writer flushes every 2 minutes, and a kill would lose those
  rounds."""

  def __init__(self, log_dir: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    tf.io.gfile.makedirs(log_dir)
    self._writer = tf.summary.create_file_writer(log_dir)

  def write(self, prefix: str, values: Mapping[str, object], step: int
            ) -> None:
    tf = self._tf
    with self._writer.as_default():
      for name, value in values.items():
        array = np.array(value)
        if array.dtype.kind not in ('b', 'i', 'u', 'f'):
          continue
        summary = tf.summary.histogram if array.shape else tf.summary.scalar
        summary(f'{prefix}/{name}', value, step=int(step))
    self._writer.flush()


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
    round_seconds: `round_num -> seconds or None`, the time of a round that
      ran in a block of rounds (its share of the block's,
      `perfed_tff.accelerator.round_blocks`), which replaces the time TFF's loop
      measured for its call.
  """

  def __init__(self, label: str, *, train_csv: str, eval_csv: Optional[str],
               tensorboard_dir: str, write: Callable[[str], None], bar=None,
               round_seconds: Optional[Callable[[int], Optional[float]]] = None):
    self._label = label
    self._train_csv = tff.program.CSVFileReleaseManager(
        train_csv, save_mode=tff.program.CSVSaveMode.APPEND,
        key_fieldname='round')
    self._eval_csv = None if eval_csv is None else (
        tff.program.CSVFileReleaseManager(
            eval_csv, save_mode=tff.program.CSVSaveMode.APPEND,
            key_fieldname='round'))
    self._tensorboard = TensorBoardWriter(tensorboard_dir)
    self._write = write
    self._bar = bar
    self._round_seconds = round_seconds or (lambda r: None)

  def _say(self, line: str) -> None:
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    else:
      self._write(line)

  def say_stopped_round(self, metrics, key) -> None:
    """The log line of a round that stopped the run before its release."""
    train = flatten_metrics(metrics)
    self._say(f'{self._label} train round {key}: ' + ' '.join(
        f'{k.rsplit("/", 1)[-1]}={_fmt(train[k])}'
        for k in (TRAIN_LOSS, NUM_NON_FINITE, NUM_WITHOUT_STEP)
        if k in train))

  async def release(self, value, key) -> None:
    flat = flatten_metrics(value)
    evaluation = collections.OrderedDict(
        (k[len(EVAL_PREFIX):], v) for k, v in flat.items()
        if k.startswith(EVAL_PREFIX))
    train = collections.OrderedDict(
        (k, v) for k, v in flat.items()
        if not k.startswith(EVAL_PREFIX) and k not in _DROPPED)
    if any(k.startswith('client_work/') for k in train):
      seconds = self._round_seconds(key)
      if seconds is not None and ROUND_SECONDS in train:
        train[ROUND_SECONDS] = seconds
      await self._train_csv.release(train, key)
      self._tensorboard.write('train', train, key)
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
    if evaluation and self._eval_csv is not None:
      await self._eval_csv.release(evaluation, key)
      self._tensorboard.write('eval', evaluation, key)
      self._say(f'{self._label} eval round {key}: '
                + eval_accuracies(evaluation))


def eval_accuracies(evaluation: Mapping[str, object]) -> str:
  """The eval log line's body: each population's mean accuracy at every
  evaluated step, e.g. 'seen accuracy step_0=0.2500 step_1=0.9000 step_5=0.9500;
  unseen accuracy step_0=...' (`evaluation`: flat 'seen/step_1/accuracy_mean'
  keys)."""
  steps = collections.OrderedDict()  # population -> {step: accuracy}
  for k, v in evaluation.items():
    match = _EVAL_ACCURACY.fullmatch(k)
    if match:
      steps.setdefault(match[1], {})[int(match[2])] = v
  return '; '.join(
      f'{population} accuracy ' + ' '.join(
          f'step_{step}={_fmt(by_step[step])}' for step in sorted(by_step))
      for population, by_step in steps.items())


def save_model_weights(path: str, model_weights, round_num: int) -> str:
  """Writes `trainable_i`, `non_trainable_i` and `round` to an .npz
  (atomically)."""
  arrays = {f'trainable_{i}': np.asarray(w)
            for i, w in enumerate(model_weights.trainable)}
  arrays.update({f'non_trainable_{i}': np.asarray(w)
                 for i, w in enumerate(model_weights.non_trainable)})
  arrays['round'] = np.int64(round_num)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    _remove(tmp)
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
