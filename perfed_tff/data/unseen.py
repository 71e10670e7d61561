"""Holding clients of a TFF dataset out of training (the unseen population),
and lazy `ClientData` views over a subset of clients."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def num_unseen_from(num_clients: int, num_unseen_users: Optional[int],
                    unseen_fraction: Optional[float]) -> int:
  """The number of unseen clients: `num_unseen_users`, or
  round(`unseen_fraction` * `num_clients`); 0 when neither is given."""
  if num_unseen_users is not None and unseen_fraction is not None:
    raise ValueError('give at most one of `num_unseen_users` and '
                     '`unseen_fraction`.')
  if unseen_fraction is not None:
    if (isinstance(unseen_fraction, bool)
        or not isinstance(unseen_fraction, (int, float))
        or not 0.0 <= unseen_fraction < 1.0):
      raise ValueError(f'`unseen_fraction` must be in [0, 1), got '
                       f'{unseen_fraction!r}.')
    return int(round(unseen_fraction * num_clients))
  n = 0 if num_unseen_users is None else num_unseen_users
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f'`num_unseen_users` must be an int >= 0, got {n!r}.')
  return int(n)


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


def common_client_ids(train, test) -> list[str]:
  """Ids present in both splits, in `train`'s order."""
  test_ids = set(test.client_ids)
  return [c for c in train.client_ids if c in test_ids]
