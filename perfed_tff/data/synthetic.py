"""FedProx's Synthetic(alpha, beta) federated dataset (no download needed).

For user k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k (60x10), b_k (10) have
entries ~ N(u_k, 1); v_k has entries ~ N(B_k, 1); x ~ N(v_k, Sigma) with
Sigma = diag(j^-1.2), j = 1..60; y = argmax softmax(x W_k + b_k). User k holds
int(lognormal(4, 2)) + 50 samples, split train/test per user. alpha controls
how different the users' models are, beta how different their inputs are;
(0, 0) is near-IID, (1, 1) strongly heterogeneous.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.data import task as task_lib
from perfed_tff.models import linear

INPUT_DIM = 60
NUM_CLASSES = 10


def generate_synthetic(alpha: float, beta: float, num_users: int, *, seed: int,
                       max_examples_per_user: int | None = 1000):
  """Returns a list of (x [n, 60] float32, y [n] int32) per user."""
  if alpha < 0 or beta < 0:
    raise ValueError(f'alpha and beta must be >= 0, got {alpha}, {beta}')
  if num_users < 1:
    raise ValueError(f'num_users must be >= 1, got {num_users}')
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


def load_synthetic(alpha: float = 1.0, beta: float = 1.0, *,
                   num_users: int = 30, num_unseen_users: int = 0,
                   train_fraction: float = 0.9, seed: int = 0,
                   max_examples_per_user: int | None = 1000
                   ) -> task_lib.FederatedTask:
  """Synthetic(alpha, beta) as a `FederatedTask` with a train/test split per
  user (first `train_fraction` of each user's samples train), plus
  `num_unseen_users` extra users for the unseen population."""
  users = generate_synthetic(alpha, beta, num_users + num_unseen_users,
                             seed=seed,
                             max_examples_per_user=max_examples_per_user)

  def split(indices):
    train, test = {}, {}
    for k in indices:
      x, y = users[k]
      n_train = max(1, int(round(train_fraction * len(y))))
      train[f'user_{k:04d}'] = collections.OrderedDict(x=x[:n_train], y=y[:n_train])
      test[f'user_{k:04d}'] = collections.OrderedDict(x=x[n_train:], y=y[n_train:])
    return _client_data(train), _client_data(test)

  train, test = split(range(num_users))
  unseen = (split(range(num_users, num_users + num_unseen_users))
            if num_unseen_users else None)
  return task_lib.FederatedTask(
      name=f'synthetic({alpha:g},{beta:g})',
      train=train, test=test, unseen=unseen,
      model_fn=linear.softmax_regression_model_fn(INPUT_DIM, NUM_CLASSES),
      keras_model_fn=lambda: linear.create_softmax_regression(INPUT_DIM, NUM_CLASSES),
      loss_fn=lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      element_spec=linear.element_spec(INPUT_DIM))
