"""Metrics files (`perfed_tff/program/metrics.py`): CSV truncation and garbage
rows, flat metrics, TensorBoard pruning, the eval log line."""

import collections
import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from perfed_tff.program import event_loop
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import outputs
from perfed_tff.program import training_loop as tp
from tests import tff_helpers as h


def test_truncate_csv(tmp_path):
  path = tmp_path / 'm.csv'
  path.write_text('round,loss\n1,0.5\n2,0.4\n3,0.3\n')
  metrics_lib.truncate_csv(str(path), 2)
  with open(path) as f:
    assert [r['round'] for r in csv.DictReader(f)] == ['1', '2']


def test_flatten_metrics():
  m = collections.OrderedDict(
      distributor=(), client_work=collections.OrderedDict(
          train=collections.OrderedDict(loss=np.float32(1.5), n=np.int64(3))))
  assert metrics_lib.flatten_metrics(m) == {'client_work/train/loss': 1.5,
                                   'client_work/train/n': 3}


def test_garbage_csv_row_is_reported_untouched(tmp_path):
  path = tmp_path / 'train.csv'
  text = 'round,loss\n1,0.5\nxx,garbage\n3,0.3\n'
  path.write_text(text)
  with pytest.raises(metrics_lib.MetricsFileError,
                     match=r"train.csv line 3 is not a metrics row "
                     r"\(round='xx'\)"):
    metrics_lib.truncate_csv(str(path), 1)
  assert path.read_text() == text


def test_garbage_row_in_existing_train_csv_is_a_checkpoint_error(
    tmp_path, small_task):
  config = h.training_config(tmp_path, rounds=2, **h.FAULTS_RUN)
  tp.run_training(config, task=small_task, process=h.StubProcess())
  csv_path = outputs.output_paths(config)['train_csv']
  with open(csv_path, 'a') as f:
    f.write('not,a,row\n')
  before = open(csv_path).read()
  with pytest.raises(tp.CheckpointError, match='is not a metrics row'):
    tp.run_training(h.training_config(tmp_path, rounds=4, **h.FAULTS_RUN),
                    task=small_task, process=h.StubProcess())
  assert open(csv_path).read() == before


def test_prune_tensorboard_keeps_each_step_once(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step in range(1, 6):
      tf.summary.scalar('loss', float(step), step=step)
  writer.close()
  assert metrics_lib.prune_tensorboard(str(tmp_path), 3) == 2
  assert metrics_lib.prune_tensorboard(str(tmp_path), 3) == 0
  steps = []
  for name in os.listdir(tmp_path):
    for raw in tf.data.TFRecordDataset(str(tmp_path / name)):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      if event.HasField('summary'):
        steps.append(event.step)
  assert sorted(steps) == [1, 2, 3]


def test_eval_log_line_shows_every_evaluated_step(tmp_path):
  lines = []
  manager = metrics_lib.RunReleaseManager(
      'per_fedavg_hf', train_csv=str(tmp_path / 'train.csv'),
      eval_csv=str(tmp_path / 'eval.csv'),
      tensorboard_dir=str(tmp_path / 'tb'), write=lines.append)
  evaluation = collections.OrderedDict()
  for population in ('seen', 'unseen', 'seen_paper'):
    for step, accuracy in ((0, 0.25), (3, 0.75), (10, 0.875)):
      evaluation[f'{population}/step_{step}/accuracy_mean'] = accuracy
      evaluation[f'{population}/step_{step}/loss_mean'] = 1.5
  event_loop.run_sync(manager.release({'evaluation': evaluation}, 4))
  assert lines == [
      'per_fedavg_hf eval round 4: '
      + '; '.join(f'{p} accuracy step_0=0.2500 step_3=0.7500 step_10=0.8750'
                  for p in ('seen', 'unseen', 'seen_paper'))]
