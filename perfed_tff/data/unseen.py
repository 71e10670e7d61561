"""Holding clients of a TFF dataset out of training (the unseen population),
and lazy `ClientData` views over a subset of clients."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks


def check_unseen_options(num_unseen_users: Optional[int],
                         unseen_fraction: Optional[float]) -> None:
  """At most one of the two is given: `num_unseen_users` an int >= 0 or
  `unseen_fraction` in [0, 1)."""
  if num_unseen_users is not None and unseen_fraction is not None:
    raise ValueError('give at most one of `num_unseen_users` and '
                     '`unseen_fraction`.')
  if unseen_fraction is not None:
    checks.bounded_float('unseen_fraction', unseen_fraction, 0, 1,
                         high_open=True)
  if num_unseen_users is not None:
    checks.integer('num_unseen_users', num_unseen_users, 0)


def split_unseen(client_ids: Sequence[str], num_unseen: int, seed: int):
  """(seen ids, unseen ids), each sorted; the `num_unseen` unseen clients are
  a uniform choice that is a pure function of (`seed`, sorted ids)."""
  client_ids = sorted(client_ids)
  if not 0 <= num_unseen < len(client_ids):
    raise ValueError(f'the number of unseen clients must be in '
                     f'[0, {len(client_ids)}) for {len(client_ids)} clients, '
                     f'got {num_unseen!r}.')
  rng = np.random.default_rng([seed, 0x5EE])
  chosen = set(rng.choice(len(client_ids), size=num_unseen,
                          replace=False).tolist())
  return ([c for i, c in enumerate(client_ids) if i not in chosen],
          [c for i, c in enumerate(client_ids) if i in chosen])


def lazy_client_data(
    source: tff.simulation.datasets.ClientData, client_ids: Sequence[str],
    preprocess_fn: Callable[[tf.data.Dataset], tf.data.Dataset],
) -> tff.simulation.datasets.ClientData:
  """`ClientData` over `client_ids` of `source`, each client's dataset passed
  through `preprocess_fn`. Datasets are built only when a client is asked for
  (for a SQL-backed source, a query per client); nothing is materialized."""
  base_fn = source.serializable_dataset_fn

  def dataset_fn(client_id):
    return preprocess_fn(base_fn(client_id))

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      list(client_ids), dataset_fn)


def populations(train, test, preprocess_fn, *, seed: int,
                num_unseen_users: Optional[int],
                unseen_fraction: Optional[float], dataset: str, path: str):
  """(train, test, unseen) of a TFF dataset's `train` and `test` splits.

  The clients in both splits (in `train`'s order) are the population;
  `num_unseen_users` of them, or round(`unseen_fraction` * their number)
  (0 when neither is given), chosen by `split_unseen`, are held out as
  `unseen` = (their train, their test) `ClientData` (None when there are
  none); `train` and `test` hold the others. Every client's dataset is
  passed through `preprocess_fn`, lazily (`lazy_client_data`).

  Raises:
    ValueError: bad unseen options, or no client in both splits (the
      message names `dataset` and the file at `path`).
  """
  check_unseen_options(num_unseen_users, unseen_fraction)
  test_ids = set(test.client_ids)
  client_ids = [c for c in train.client_ids if c in test_ids]
  if not client_ids:
    raise ValueError(f'{dataset}: no client has both train and test examples in '
                     f'{path}.')
  if unseen_fraction is not None:
    num_unseen = int(round(unseen_fraction * len(client_ids)))
  else:
    num_unseen = int(num_unseen_users or 0)
  seen, unseen_ids = split_unseen(client_ids, num_unseen, seed)

  def client_data(split, ids):
    return lazy_client_data(split, ids, preprocess_fn)

  unseen = ((client_data(train, unseen_ids), client_data(test, unseen_ids))
            if unseen_ids else None)
  return client_data(train, seen), client_data(test, seen), unseen
