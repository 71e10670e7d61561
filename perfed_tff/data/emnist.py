"""Federated EMNIST through TFF's own loader, as a `FederatedTask`.

`tff.simulation.datasets.emnist.load_data(only_digits, cache_dir)` reads
`<cache_dir>/emnist_all.sqlite` (splits `digits_only_train/test`,
`all_train/test`; one client per writer; examples `pixels` float32 [28, 28] in
[0, 1] with 1.0 the background, `label` int32 in 0..9 or 0..61). Each example
becomes OrderedDict(x=pixels[..., None] [28, 28, 1] float32, y=label int32).

Every writer's train split is its training data and its test split its held-out
data (the same client ids in both). `num_unseen_users` writers (a seeded
choice) are removed from training and form the unseen population.

Client datasets are SQL queries built only when a client is asked for
(`SqlClientData`), so memory does not grow with the 3,400-writer population.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.data import offline
from perfed_tff.data import task as task_lib
from perfed_tff.data import unseen as unseen_lib
from perfed_tff.models import emnist as emnist_models
from perfed_tff.models import mlp

FILENAME = 'emnist_all.sqlite'
MODELS = ('cnn', 'mlp')


def to_xy(example) -> collections.OrderedDict:
  """TFF's EMNIST example -> OrderedDict(x [28, 28, 1] float32, y int32)."""
  return collections.OrderedDict(
      x=tf.expand_dims(tf.cast(example['pixels'], tf.float32), -1),
      y=tf.cast(example['label'], tf.int32))


def load_emnist(*, only_digits: bool = True, cache_dir: Optional[str] = None,
                model: str = 'cnn', seed: int = 0,
                num_unseen_users: Optional[int] = None,
                unseen_fraction: Optional[float] = None,
                download: bool = True,
                download_timeout: float = offline.DEFAULT_DOWNLOAD_TIMEOUT
                ) -> task_lib.FederatedTask:
  """EMNIST-10 (`only_digits`) or EMNIST-62 as a `FederatedTask`.

  Args:
    only_digits: 10 digit classes (True) or 62 characters (False).
    cache_dir: directory holding `emnist_all.sqlite` (`None`: `~/.tff`).
    model: 'cnn' (TFF's EMNIST CNN) or 'mlp' (the paper's 80-60 ELU MLP).
    seed: seeds the choice of unseen clients and the model initialization.
    num_unseen_users / unseen_fraction: clients held out of training.
    download: whether TFF may try to download a missing file.
    download_timeout: socket timeout (s) for that download.

  Raises:
    offline.DatasetUnavailableError: the file is missing and not downloaded.
  """
  checks.choice('model', model, MODELS)
  unseen_lib.check_unseen_options(num_unseen_users, unseen_fraction)  # Before reading.
  name = 'EMNIST' if only_digits else 'EMNIST-62'
  train, test = offline.load_tff_file(
      name, FILENAME,
      lambda d: tff.simulation.datasets.emnist.load_data(
          only_digits=only_digits, cache_dir=d),
      cache_dir, download=download, download_timeout=download_timeout)
  train, test, unseen = unseen_lib.populations(
      train, test, lambda d: d.map(to_xy), seed=seed,
      num_unseen_users=num_unseen_users, unseen_fraction=unseen_fraction,
      dataset=name,
      path=os.path.join(offline.resolve_cache_dir(cache_dir), FILENAME))

  num_classes = 10 if only_digits else 62
  if model == 'cnn':
    model_fn = emnist_models.emnist_cnn_model_fn(num_classes, seed=seed)
    keras_model_fn = lambda: emnist_models.create_emnist_cnn(num_classes, seed)
  else:
    model_fn = mlp.mlp_model_fn(emnist_models.IMAGE_SHAPE, num_classes,
                                seed=seed)
    keras_model_fn = lambda: mlp.create_mlp(emnist_models.IMAGE_SHAPE,
                                            num_classes, seed=seed)
  return task_lib.FederatedTask(
      name=f"{'emnist' if only_digits else 'emnist62'}({model})",
      train=train, test=test, unseen=unseen,
      model_fn=model_fn,
      keras_model_fn=keras_model_fn,
      loss_fn=emnist_models.loss_fn,
      element_spec=emnist_models.element_spec())
