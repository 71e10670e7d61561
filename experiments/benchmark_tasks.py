"""The benchmark's tasks: clients' arrays, the model, and a round's client data.

A task (`make_task`) is every client's unbatched examples as numpy arrays and
the model trained on them (as a VariableModel and as a FunctionalModel). The
data of round r are a pure function of (seed, r, client), so that every
contender sees the same batches: `cohort` samples the round's clients,
`client_datasets` makes their batch streams and `round_inputs` the inputs from
which TFF's worker builds the very same streams.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets

TASKS = ('emnist_cnn', 'emnist_mlp', 'digits_mlp', 'synthetic',
         'shakespeare_lstm')


@dataclasses.dataclass
class BenchmarkTask:
  """Clients' unbatched arrays and the model to train on them."""
  name: str
  data_note: str
  clients: 'collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]]'
  model_fn: Callable[[], tff.learning.models.VariableModel]
  element_spec: collections.OrderedDict   # spec of one batch
  # The same model as a FunctionalModel, as the program trains it
  # (`perfed_tff.data.task.functional_model`; `loss_metric=True` for FedAvg).
  functional_model: Optional[
      Callable[..., tff.learning.models.FunctionalModel]] = None


def _synthetic_emnist_clients(num_clients, examples_per_client, seed):
  rng = np.random.default_rng(seed)
  clients = collections.OrderedDict()
  for k in range(num_clients):
    x = rng.random((examples_per_client, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 62, examples_per_client).astype(np.int32)
    clients[f'client_{k:04d}'] = (x, y)
  return clients


def _client_arrays(client_data, client_ids):
  """Unbatched examples of each client as numpy arrays."""
  out = collections.OrderedDict()
  for cid in client_ids:
    ds = client_data.create_tf_dataset_for_client(cid)
    batch = next(iter(ds.batch(1_000_000)))
    out[cid] = (batch['x'].numpy(), batch['y'].numpy().astype(np.int32))
  return out


def make_task(name: str, *, num_clients: int = 20,
              examples_per_client: int = 200, seed: int = 0) -> BenchmarkTask:
  """Benchmark task `name` (one of TASKS) with `num_clients` clients.

  emnist_cnn / emnist_mlp: the project's EMNIST CNN (62 classes) or the
  paper's 80-60 MLP on random data of EMNIST's shape (no download; timing does
  not depend on pixel values). digits_mlp: the real scikit-learn digits
  split (`registry.load_task('digits')`) with its paper MLP. synthetic:
  Synthetic(1, 1) with softmax regression.
  """
  from perfed_tff.models import emnist as emnist_models  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  if name in ('emnist_cnn', 'emnist_mlp'):
    if name == 'emnist_cnn':
      model_fn = emnist_models.emnist_cnn_model_fn(num_classes=62, seed=seed)
      keras_model_fn = lambda: emnist_models.create_emnist_cnn(62, seed)
    else:
      model_fn = mlp.mlp_model_fn(emnist_models.IMAGE_SHAPE, 62, seed=seed)
      keras_model_fn = lambda: mlp.create_mlp(emnist_models.IMAGE_SHAPE, 62,
                                              seed=seed)
    return BenchmarkTask(
        name=name,
        data_note=('random data in EMNIST\'s shape (28x28x1 float pixels, '
                   f'62 classes, {examples_per_client} examples per client), '
                   'not real EMNIST; timing does not depend on pixel values'),
        clients=_synthetic_emnist_clients(num_clients, examples_per_client,
                                          seed),
        model_fn=model_fn,
        element_spec=emnist_models.element_spec(),
        functional_model=lambda **kw: task_lib.functional_model(
            keras_model_fn, emnist_models.loss_fn,
            emnist_models.element_spec(), task_lib.accuracy_metrics, **kw))
  if name in ('digits_mlp', 'synthetic'):
    from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
    if name == 'digits_mlp':
      task = registry.load_task('digits', seed=seed, num_users=num_clients)
      note = ('real scikit-learn 8x8 digits (1,797 images), 2 classes per '
              'client, 80-60 ELU MLP')
    else:
      task = registry.load_task('synthetic', seed=seed, num_users=num_clients)
      note = 'FedProx Synthetic(1, 1), softmax regression'
    return BenchmarkTask(
        name=name, data_note=note,
        clients=_client_arrays(task.train, task.train.client_ids[:num_clients]),
        model_fn=task.model_fn, element_spec=task.element_spec,
        functional_model=task.functional_model)
  if name == 'shakespeare_lstm':
    from perfed_tff.data import shakespeare as shakespeare_data  # pylint: disable=g-import-not-at-top
    from perfed_tff.models import shakespeare as shakespeare_models  # pylint: disable=g-import-not-at-top
    length = shakespeare_data.DEFAULT_SEQUENCE_LENGTH
    rng = np.random.default_rng(seed)
    clients = collections.OrderedDict()
    n = max(1, examples_per_client // 4)   # snippets are long: fewer of them
    for k in range(num_clients):
      x = rng.integers(1, shakespeare_data.VOCAB_SIZE, (n, length),
                       dtype=np.int32)
      clients[f'client_{k:04d}'] = (x, np.roll(x, -1, axis=1))
    return BenchmarkTask(
        name=name,
        data_note=(f'random characters in Shakespeare\'s shape ({n} '
                   f'sequences of {length} per client), the project\'s char '
                   'LSTM; not real Shakespeare'),
        clients=clients,
        model_fn=shakespeare_models.char_lstm_model_fn(
            shakespeare_data.VOCAB_SIZE, length, seed=seed),
        element_spec=shakespeare_models.element_spec(length),
        functional_model=lambda **kw: task_lib.functional_model(
            lambda: shakespeare_models.create_char_lstm(
                shakespeare_data.VOCAB_SIZE, length, seed=seed),
            lambda: shakespeare_models.loss_fn(shakespeare_models.PAD_ID),
            shakespeare_models.element_spec(length),
            lambda: [shakespeare_models.MaskedSparseCategoricalAccuracy(
                shakespeare_models.PAD_ID),
                     shakespeare_models.NumTokens(shakespeare_models.PAD_ID)],
            **kw))
  raise ValueError(f'unknown task {name!r}; one of {TASKS}')


def client_datasets(task: BenchmarkTask, client_ids: Sequence[str], *,
                    num_batches: int, batch_size: int, seed: int,
                    round_num: int) -> list[tf.data.Dataset]:
  """The batch streams of `client_ids` in round `round_num` (a pure function
  of (seed, round, client), so every contender sees the same batches), made
  by the project's `data.task.client_batches` (tf.data autotuning and graph
  rewrites off, as for every client stream of the project: with autotuning
  on, the floor's rounds once stalled to exactly 2.56 s or 5.12 s on the
  2-core machine, tf.data's autotuning period doubling from 10 ms).
  """
  out = []
  for cid in client_ids:
    x, y = task.clients[cid]
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    out.append(task_lib.client_batches(
        ds, batch_size=batch_size, num_batches=num_batches,
        seed=task_lib.derive_seed(seed, round_num, cid)))
  return out


def cohort(task: BenchmarkTask, config, round_num: int) -> list[str]:
  """The clients of round `round_num` (a pure function of (seed, round)):
  `config.clients_per_round` of them, seeded by `config.seed`."""
  return task_lib.sample_clients(list(task.clients), config.clients_per_round,
                                 config.seed, round_num)


def round_inputs(task: BenchmarkTask, config,
                 round_num: int, *, empty: bool = False) -> list:
  """The round's cohort as inputs of a worker-side TFF process
  (`perfed_tff.data.worker_datasets`): each client's examples and its seed
  `derive_seed(seed, round, client)`, from which the worker builds exactly
  the batches of `client_datasets` (`empty`: no examples)."""
  out = []
  for cid in cohort(task, config, round_num):
    x, y = task.clients[cid]
    if empty:
      x, y = x[:0], y[:0]
    out.append(worker_datasets.client_input(
        collections.OrderedDict(x=x, y=y),
        task_lib.derive_seed(config.seed, round_num, cid)))
  return out
