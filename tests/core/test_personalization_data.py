"""What the personalized evaluation reads
(`perfed_tff/personalization_data.py`): adaptation batches from the
client's train data only, the protocols, the worker-side evaluation built
once per batch sizes."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from perfed_tff import checks
from perfed_tff import personalization_data
from tests import tff_helpers as h


def test_adaptation_batches_come_from_train_only():
  x_tr, y_tr, x_te, y_te = h.eval_client(0, 13, 6, 2.0)
  for batch_size in (4, None):
    data = personalization_data.client_input(
        h.dataset(x_tr, y_tr), h.dataset(x_te, y_te), num_steps=5,
        adapt_batch_size=batch_size, seed=1)
    train_rows = {tuple(r) for r in x_tr}
    test_rows = {tuple(r) for r in x_te}
    batches = list(data['train_data'].as_numpy_iterator())
    assert len(batches) == 5
    for b in batches:
      assert len(b['x']) == (batch_size or 13)
      for row in b['x']:
        assert tuple(row) in train_rows and tuple(row) not in test_rows
    test_seen = np.concatenate([b['x'] for b in data['test_data']])
    assert {tuple(r) for r in test_seen} == test_rows


def test_protocols_are_checked_by_name():
  assert personalization_data.check_protocol('paper') == 'paper'
  with pytest.raises(checks.ArgumentError, match='`eval_protocols`'):
    personalization_data.check_protocol('leaky')


def test_the_worker_side_evaluation_is_built_once_per_batch_sizes(eval_1_2):
  spec = collections.OrderedDict(
      x=tf.TensorSpec([h.EVAL_DIM], tf.float32),
      y=tf.TensorSpec([], tf.int32))
  first = personalization_data.worker_side_evaluation(
      eval_1_2, spec, adapt_batch_size=4)
  assert personalization_data.worker_side_evaluation(
      eval_1_2, spec, adapt_batch_size=4) is first
  assert personalization_data.worker_side_evaluation(
      eval_1_2, spec, adapt_batch_size=None) is not first
  assert set(eval_1_2.worker_side) >= {(4, 256), (None, 256)}
