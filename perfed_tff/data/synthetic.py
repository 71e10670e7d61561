"""FedProx's Synthetic(alpha, beta) federated dataset (no download needed).

For user k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k (60x10), b_k (10) have
entries ~ N(u_k, 1); v_k has entries ~ N(B_k, 1); x ~ N(v_k, Sigma) with
Sigma = diag(j^-1.2), j = 1..60; y = argmax softmax(x W_k + b_k). User k holds
int(lognormal(4, 2)) + 50 samples, split train/test per user.

The paper's alpha and beta are the arguments (and dataset options)
`model_heterogeneity` (alpha: how different the users' models are) and
`input_heterogeneity` (beta: how different their inputs are), named so that
they are not mistaken for the step sizes alpha and beta; (0, 0) is near-IID,
(1, 1) strongly heterogeneous. The task is still named `synthetic(alpha,beta)`.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.models import linear

INPUT_DIM = 60
NUM_CLASSES = 10


# Bytes of one example (x float32 [60], y int32) and the share of physical
# memory a population may take.
EXAMPLE_BYTES = INPUT_DIM * 4 + 4
MEMORY_SHARE = 0.5
MAX_HETEROGENEITY = 100.0
# The dataset options these arguments had before (the paper's symbols, which
# are also the names of the step sizes), and their names now.
RENAMED_OPTIONS = {'alpha': 'model_heterogeneity',
                   'beta': 'input_heterogeneity'}


def _physical_memory() -> int:
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return 0


def check_population_memory(num_users: int,
                            max_examples_per_user: int | None) -> None:
  """Raises ValueError when `num_users` users of up to
  `max_examples_per_user` examples (None: 1000 assumed) would take more
  than MEMORY_SHARE of physical memory."""
  need = num_users * (max_examples_per_user or 1000) * EXAMPLE_BYTES
  have = _physical_memory()
  if have and need > MEMORY_SHARE * have:
    raise ValueError(
        f'`num_users`: {num_users} users of up to '
        f'{max_examples_per_user or 1000} examples need up to '
        f'{need / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of this '
        f"machine's {have / 2**30:.1f} GiB; use fewer users or a smaller "
        'max_examples_per_user.')


def generate_synthetic(model_heterogeneity: float, input_heterogeneity: float,
                       num_users: int, *, seed: int,
                       max_examples_per_user: int | None = 1000):
  """Returns a list of (x [n, 60] float32, y [n] int32) per user.

  `model_heterogeneity` is the paper's alpha (std of u_k),
  `input_heterogeneity` its beta (std of B_k), each in [0, 100]."""
  alpha = checks.bounded_float('model_heterogeneity', model_heterogeneity, 0,
                               MAX_HETEROGENEITY)
  beta = checks.bounded_float('input_heterogeneity', input_heterogeneity, 0,
                              MAX_HETEROGENEITY)
  checks.integer('num_users', num_users, 1)
  if max_examples_per_user is not None:
    checks.integer('max_examples_per_user', max_examples_per_user, 2)
  check_population_memory(num_users, max_examples_per_user)
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_users).astype(np.int64) + 50
  if max_examples_per_user is not None:
    sizes = np.minimum(sizes, max_examples_per_user)
  cov_sqrt = np.arange(1, INPUT_DIM + 1, dtype=np.float64) ** (-1.2 / 2)
  users = []
  for k in range(num_users):
    u_k = rng.normal(0, alpha)
    b_k_mean = rng.normal(0, beta)
    v_k = rng.normal(b_k_mean, 1, INPUT_DIM)
    w_k = rng.normal(u_k, 1, (INPUT_DIM, NUM_CLASSES))
    b_k = rng.normal(u_k, 1, NUM_CLASSES)
    x = v_k + rng.normal(size=(sizes[k], INPUT_DIM)) * cov_sqrt
    y = np.argmax(x @ w_k + b_k, axis=1)
    users.append((x.astype(np.float32), y.astype(np.int32)))
  return users


def _client_data(arrays: dict) -> tff.simulation.datasets.ClientData:
  return tff.simulation.datasets.TestClientData(arrays)


def load_synthetic(model_heterogeneity: float = 1.0,
                   input_heterogeneity: float = 1.0, *,
                   num_users: int = 30, num_unseen_users: int = 0,
                   train_fraction: float = 0.9, seed: int = 0,
                   max_examples_per_user: int | None = 1000
                   ) -> task_lib.FederatedTask:
  """Synthetic(alpha, beta) as a `FederatedTask` with a train/test split per
  user (first `train_fraction` of each user's samples train), plus
  `num_unseen_users` extra users for the unseen population.
  `model_heterogeneity` is the paper's alpha, `input_heterogeneity` its beta.

  Raises:
    ValueError: an argument out of range (model_heterogeneity,
      input_heterogeneity in [0, 100]; users >= checks.MIN_USERS; unseen
      users >= 0; train_fraction in (0, 1) leaving every user a test
      example; max_examples_per_user None or >= 2), or a population that
      would not fit in memory.
  """
  checks.integer('num_users', num_users, checks.MIN_USERS)
  checks.integer('num_unseen_users', num_unseen_users, 0)
  checks.bounded_float('train_fraction', train_fraction, 0, 1, low_open=True,
                       high_open=True)
  users = generate_synthetic(model_heterogeneity, input_heterogeneity,
                             num_users + num_unseen_users, seed=seed,
                             max_examples_per_user=max_examples_per_user)

  def split(indices):
    train, test = {}, {}
    for k in indices:
      x, y = users[k]
      n_train = max(1, int(round(train_fraction * len(y))))
      if n_train >= len(y):
        raise ValueError(
            f'`train_fraction`={train_fraction!r} leaves user {k} ({len(y)} '
            'examples) no test example; use a smaller train_fraction.')
      train[f'user_{k:04d}'] = collections.OrderedDict(x=x[:n_train], y=y[:n_train])
      test[f'user_{k:04d}'] = collections.OrderedDict(x=x[n_train:], y=y[n_train:])
    return _client_data(train), _client_data(test)

  train, test = split(range(num_users))
  unseen = (split(range(num_users, num_users + num_unseen_users))
            if num_unseen_users else None)
  return task_lib.FederatedTask(
      name=f'synthetic({model_heterogeneity:g},{input_heterogeneity:g})',
      train=train, test=test, unseen=unseen,
      model_fn=linear.softmax_regression_model_fn(INPUT_DIM, NUM_CLASSES),
      keras_model_fn=lambda: linear.create_softmax_regression(INPUT_DIM, NUM_CLASSES),
      loss_fn=lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      element_spec=linear.element_spec(INPUT_DIM))
