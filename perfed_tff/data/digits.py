"""Paper-style label skew on scikit-learn's bundled 8x8 digits (no download).

`sklearn.datasets.load_digits()`: 1,797 images of 10 classes, 8x8 pixels with
values 0..16; x = pixels / 16 flattened to [64] float32, y int32.

Label skew (Fallah et al. 2020; each user sees only c classes): users
u = 0..N-1 (N = num_users + num_unseen_users) in turn take the c classes held
by the fewest users so far, ties broken by a seeded random order. So every user
holds c distinct classes, every class is held by floor or ceil of N c / 10
users, and the class sets vary with the seed. The examples
of class k, shuffled with the seed, are cut into equal shards, one per holder
of k, so no example belongs to two users. Inside each user every class shard
is split train/test (round(train_fraction * shard), at least one example on
each side), so a user's train and test data both cover its c classes.
Users 0..num_users-1 are trained on; the rest form the unseen population.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.models import linear
from perfed_tff.models import mlp

NUM_CLASSES = 10
INPUT_DIM = 64
MODELS = ('mlp', 'linear')


def load_arrays():
  """(x [1797, 64] float32 in [0, 1], y [1797] int32) from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.data.astype(np.float32) / 16.0).reshape(-1, INPUT_DIM)
  return x, digits.target.astype(np.int32)


def split_label_skew(labels: np.ndarray, num_users: int, classes_per_user: int,
                     *, seed: int, train_fraction: float = 0.8):
  """Index sets of a label-skew split (see the module docstring).

  Args:
    labels: int array [n] with values 0..K-1 (K = labels.max() + 1).
    num_users: number of users N (all of them, seen and unseen).
    classes_per_user: c, 1 <= c <= K.
    seed: the split is a pure function of (labels, N, c, seed, train_fraction).
    train_fraction: share of every class shard used for training, in (0, 1).

  Returns:
    A list of N (train_indices, test_indices) int64 arrays into `labels`.

  Raises:
    ValueError: bad arguments, or a class too small to give each of its
      holders at least 2 examples (one train, one test).
  """
  labels = np.asarray(labels)
  num_users = checks.integer('num_users', num_users, 1)
  num_classes = int(labels.max()) + 1 if labels.size else 0
  c = checks.integer('classes_per_user', classes_per_user, 1)
  if c > num_classes:
    raise checks.ArgumentError('classes_per_user', f'must be <= {num_classes} '
                               f'(the number of classes), got {c}')
  checks.bounded_float('train_fraction', train_fraction, 0, 1, low_open=True,
                       high_open=True)
  rng = np.random.default_rng(seed)
  counts = np.zeros(num_classes, np.int64)
  user_classes = []
  for _ in range(num_users):
    order = rng.permutation(num_classes)
    order = order[np.argsort(counts[order], kind='stable')][:c]
    counts[order] += 1
    user_classes.append(sorted(int(k) for k in order))
  holders = collections.defaultdict(list)
  for u, classes in enumerate(user_classes):
    for k in classes:
      holders[k].append(u)
  train = [[] for _ in range(num_users)]
  test = [[] for _ in range(num_users)]
  for k in range(num_classes):
    if not holders[k]:
      continue
    idx = rng.permutation(np.flatnonzero(labels == k))
    if len(idx) < 2 * len(holders[k]):
      raise ValueError(
          f'class {k} has {len(idx)} examples, too few for {len(holders[k])} '
          'users (each needs >= 2); use fewer users or classes_per_user.')
    for u, shard in zip(holders[k], np.array_split(idx, len(holders[k]))):
      n_train = min(max(int(round(train_fraction * len(shard))), 1), len(shard) - 1)
      train[u].append(shard[:n_train])
      test[u].append(shard[n_train:])
  return [(np.sort(np.concatenate(tr)).astype(np.int64),
           np.sort(np.concatenate(te)).astype(np.int64))
          for tr, te in zip(train, test)]


def _client_data(x, y, index_sets, user_ids):
  return tff.simulation.datasets.TestClientData({
      uid: collections.OrderedDict(x=x[idx], y=y[idx])
      for uid, idx in zip(user_ids, index_sets)})


def vector_classification_task(name, train, test, unseen, *, input_dim: int,
                               model: str, seed: int,
                               hidden_units=mlp.PAPER_HIDDEN_UNITS
                               ) -> task_lib.FederatedTask:
  """A `FederatedTask` of flat [input_dim] float32 inputs and 10 classes with
  the paper's MLP (`model='mlp'`) or softmax regression (`'linear'`)."""
  if model == 'mlp':
    hidden_units = tuple(hidden_units)
    model_fn = mlp.mlp_model_fn((input_dim,), NUM_CLASSES,
                                hidden_units=hidden_units, seed=seed)
    keras_model_fn = lambda: mlp.create_mlp((input_dim,), NUM_CLASSES,
                                            hidden_units=hidden_units, seed=seed)
  else:
    model_fn = linear.softmax_regression_model_fn(input_dim, NUM_CLASSES, seed)
    keras_model_fn = lambda: linear.create_softmax_regression(
        input_dim, NUM_CLASSES, seed)
  return task_lib.FederatedTask(
      name=name, train=train, test=test, unseen=unseen,
      model_fn=model_fn, keras_model_fn=keras_model_fn,
      loss_fn=mlp.loss_fn,
      element_spec=mlp.element_spec((input_dim,)))


def load_digits_task(*, num_users: int = 50, classes_per_user: int = 2,
                     num_unseen_users: int = 0, train_fraction: float = 0.8,
                     seed: int = 0, model: str = 'mlp',
                     hidden_units=mlp.PAPER_HIDDEN_UNITS
                     ) -> task_lib.FederatedTask:
  """8x8 digits split over `num_users` (>= checks.MIN_USERS) users holding
  `classes_per_user` classes each (plus `num_unseen_users` never-trained
  users), with the paper's MLP (`model='mlp'`) or softmax regression
  (`model='linear'`)."""
  checks.choice('model', model, MODELS)
  num_users = checks.integer('num_users', num_users, checks.MIN_USERS)
  num_unseen_users = checks.integer('num_unseen_users', num_unseen_users, 0)
  x, y = load_arrays()
  splits = split_label_skew(y, num_users + num_unseen_users, classes_per_user,
                            seed=seed, train_fraction=train_fraction)
  ids = [f'user_{u:04d}' for u in range(len(splits))]

  def client_data(users):
    return (_client_data(x, y, [splits[u][0] for u in users], [ids[u] for u in users]),
            _client_data(x, y, [splits[u][1] for u in users], [ids[u] for u in users]))

  train, test = client_data(range(num_users))
  unseen = (client_data(range(num_users, num_users + num_unseen_users))
            if num_unseen_users else None)
  return vector_classification_task(
      f'digits(n={num_users},c={classes_per_user},{model})', train, test,
      unseen, input_dim=INPUT_DIM, model=model, seed=seed,
      hidden_units=hidden_units)
