"""Paper-style label skew on scikit-learn's 8x8 digits."""

import collections

import numpy as np
import pytest
from sklearn import datasets

from perfed_tff.data import digits
from perfed_tff.data import registry
from tests import data_fixtures as fx

LABELS = datasets.load_digits().target


def _check_split(labels, splits, num_users, c):
  seen = np.zeros(len(labels), bool)
  holders = collections.Counter()
  for train, test in splits:
    assert set(labels[train]) == set(labels[test])
    assert len(set(labels[train])) == c          # exactly c classes
    assert not set(train) & set(test)            # train/test disjoint
    both = np.concatenate([train, test])
    assert not seen[both].any()                  # no example in two users
    seen[both] = True
    holders.update(set(labels[train]))
  num_classes = labels.max() + 1
  lo, hi = num_users * c // num_classes, -(-num_users * c // num_classes)
  assert all(lo <= holders[k] <= hi for k in range(num_classes))
  return seen


@pytest.mark.parametrize('num_users,c', [(50, 2), (30, 3), (7, 1), (20, 10)])
def test_every_user_has_exactly_c_classes_and_no_shared_example(num_users, c):
  splits = digits.split_label_skew(LABELS, num_users, c, seed=1)
  assert len(splits) == num_users
  seen = _check_split(LABELS, splits, num_users, c)
  if num_users * c % 10 == 0:   # Every class is fully handed out.
    assert seen.all()


def test_hand_computed_small_split():
  labels = np.repeat([0, 1, 2], 4)   # 3 classes x 4 examples
  splits = digits.split_label_skew(labels, 3, 2, seed=0, train_fraction=0.5)
  # 3 users x 2 classes = 6 slots -> each class held by exactly 2 users, its
  # 4 examples cut into 2 shards of 2 -> 1 train + 1 test example per class.
  for train, test in splits:
    assert len(train) == 2 and len(test) == 2
  _check_split(labels, splits, 3, 2)
  all_idx = np.sort(np.concatenate([np.concatenate(s) for s in splits]))
  np.testing.assert_array_equal(all_idx, np.arange(12))


def test_same_seed_same_split_other_seed_other_split():
  a = digits.split_label_skew(LABELS, 50, 2, seed=4)
  b = digits.split_label_skew(LABELS, 50, 2, seed=4)
  c = digits.split_label_skew(LABELS, 50, 2, seed=5)
  for (tra, tea), (trb, teb) in zip(a, b):
    np.testing.assert_array_equal(tra, trb)
    np.testing.assert_array_equal(tea, teb)
  assert any(len(x[0]) != len(y[0]) or (x[0] != y[0]).any() for x, y in zip(a, c))
  assert ([sorted(set(LABELS[s[0]])) for s in a]
          != [sorted(set(LABELS[s[0]])) for s in c])


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_users=0, classes_per_user=2), '`num_users` must be an integer >= 1'),
    (dict(num_users=5, classes_per_user=0), '`classes_per_user` must be an integer >= 1'),
    (dict(num_users=5, classes_per_user=11), r'`classes_per_user` must be <= 10'),
    (dict(num_users=5, classes_per_user=2, train_fraction=1.0),
     r'`train_fraction` must be a number in \(0, 1\)'),
    (dict(num_users=200, classes_per_user=10), 'too few for 200 users'),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    digits.split_label_skew(LABELS, seed=0, **kwargs)


def test_task_examples_unseen_users_and_model():
  task = registry.load_task('digits', seed=2, num_users=10, classes_per_user=2,
                            num_unseen_users=3)
  raw = datasets.load_digits()
  splits = digits.split_label_skew(raw.target, 13, 2, seed=2)
  assert task.client_ids == [f'user_{u:04d}' for u in range(10)]
  assert task.unseen[0].client_ids == ['user_0010', 'user_0011', 'user_0012']
  for data, part in ((task.train, 0), (task.test, 1)):
    for u, cid in ((0, 'user_0000'), (9, 'user_0009')):
      ex = list(data.create_tf_dataset_for_client(cid).as_numpy_iterator())
      x = np.stack([e['x'] for e in ex])
      y = np.array([e['y'] for e in ex])
      assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape[1:] == (64,)
      np.testing.assert_allclose(x, raw.data[splits[u][part]] / 16.0)
      np.testing.assert_array_equal(y, raw.target[splits[u][part]])
  ex = next(iter(task.unseen[1].create_tf_dataset_for_client('user_0012')))
  np.testing.assert_allclose(ex['x'], raw.data[splits[12][1][0]] / 16.0)
  assert task.element_spec['x'].shape.as_list() == [None, 64]
  model = task.keras_model_fn()
  # 64*80+80 + 80*60+60 + 60*10+10: the paper's two hidden layers (80, 60).
  assert model.count_params() == 10670
  assert registry.load_task('digits', model='linear').keras_model_fn(
  ).count_params() == 650


@pytest.mark.parametrize('algorithm', ['per_fedavg_hf', 'fedavg'])
def test_round_end_to_end(algorithm):
  task = registry.load_task('digits', num_users=10, seed=0)
  clients = task.client_ids[:2]
  # Examples consumed: 2 clients x (3 batches for HF, 1 for FedAvg) x 2;
  # the round's loss is recomputed with NumPy from the Keras model.
  model, metrics = fx.run_checked_round(task, algorithm, clients)
  batches = fx.first_batches(task, algorithm, client_ids=clients)
  losses = [fx.softmax_cross_entropy(model(b['x']).numpy(), b['y']).mean()
            for b in batches]
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-5)
