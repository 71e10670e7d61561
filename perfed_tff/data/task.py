"""`FederatedTask`: a federated dataset, its batch stream and its default model.

Every dataset (synthetic, digits, EMNIST, Shakespeare) is exposed the same way:

* `train` / `test`: `tff.simulation.datasets.ClientData` of unbatched examples
  `OrderedDict(x=..., y=...)` (or `(x, y)` tuples: a TFF baseline task's,
  `perfed_tff.data.baseline_tasks`); the same client ids in both (each
  user's own train and held-out test data).
* `unseen`: optional `(train, test)` pair of users never used in training.
* `model_fn`: no-arg callable returning a `tff.learning.models.VariableModel`.
* `keras_model_fn`: the Keras model behind it (for pure-TF code).
* `metrics_fn`: the Keras metrics `model_fn` reports (default: accuracy).
* `functional_model()`: the same model as a
  `tff.learning.models.FunctionalModel` (same Keras model, loss, initial
  weights and metric names; no variables, so no per-client model set-up).
* `ignore_label`: a label value that accuracy skips (Shakespeare's padding).

`client_batches` turns one client's examples into the batch stream consumed by
the client work (shuffled with a per-client, per-round seed, repeated as
needed, batched, cut at `num_batches`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def accuracy_metrics() -> list:
  return [tf.keras.metrics.SparseCategoricalAccuracy()]


@dataclasses.dataclass(frozen=True)
class FederatedTask:
  name: str
  train: tff.simulation.datasets.ClientData
  test: tff.simulation.datasets.ClientData
  model_fn: Callable[[], tff.learning.models.VariableModel]
  keras_model_fn: Callable[[], tf.keras.Model]
  loss_fn: Callable[[], tf.keras.losses.Loss]
  element_spec: object   # spec of one *batch*: OrderedDict(x, y) or (x, y)
  unseen: Optional[tuple] = None   # (train ClientData, test ClientData)
  shuffle_buffer: int = 1000
  ignore_label: Optional[int] = None  # label left out of accuracy (padding)
  metrics_fn: Callable[[], list] = accuracy_metrics  # model_fn's metrics

  @property
  def client_ids(self) -> Sequence[str]:
    return self.train.client_ids

  def functional_model(self, *, loss_metric: bool = False
                       ) -> tff.learning.models.FunctionalModel:
    """`model_fn`'s model as a `tff.learning.models.FunctionalModel` (see
    `functional_model`)."""
    return functional_model(self.keras_model_fn, self.loss_fn,
                            self.element_spec, self.metrics_fn,
                            loss_metric=loss_metric)


class WeightedMeanLoss(tf.keras.metrics.Mean):
  """The `loss` metric `tff.learning.models.from_keras_model` adds: the loss
  of each batch (`loss_fn` on its labels and predictions), averaged with the
  batch sizes as weights."""

  def __init__(self, loss_fn: tf.keras.losses.Loss, name: str = 'loss',
               dtype=tf.float32):
    super().__init__(name, dtype)
    self._loss_fn = loss_fn

  def update_state(self, y_true, y_pred, sample_weight=None):  # pylint: disable=arguments-renamed
    del sample_weight  # As from_keras_model's: the batch size is the weight.
    batch_size = tf.shape(tf.nest.flatten(y_pred)[0])[0]
    return super().update_state(self._loss_fn(y_true, y_pred), batch_size)


def functional_model_carries(keras_model_fn: Callable[[], tf.keras.Model]
                             ) -> bool:
  """Whether `functional_model` of `keras_model_fn`'s model trains what
  `from_keras_model` of it trains: TFF's `functional_model_from_keras`
  leaves out regularization losses (TFF's TODO b/156629927) and cannot
  update BatchNormalization statistics."""
  with tf.Graph().as_default():
    model = keras_model_fn()
    return not model.losses and not any(
        isinstance(m, tf.keras.layers.BatchNormalization)
        for m in model.submodules)


def functional_model(keras_model_fn: Callable[[], tf.keras.Model],
                     loss_fn: Callable[[], tf.keras.losses.Loss],
                     element_spec, metrics_fn: Callable[[], list], *,
                     loss_metric: bool = False
                     ) -> tff.learning.models.FunctionalModel:
  """The model `tff.learning.models.from_keras_model` makes of these parts,
  as a FunctionalModel: `functional_model_from_keras` on `keras_model_fn`
  (initialized in a graph, as TFF initializes a VariableModel: the same
  initial weights) and `loss_fn()`, with `metrics_fn()`'s metrics plus the
  example and batch counts that `from_keras_model` adds (the same names).
  With `loss_metric`, also its `loss` metric (`WeightedMeanLoss`), so that
  FedAvg's metrics are those of the VariableModel (`perfed_tff.fed_avg`);
  Per-FedAvg reports its own `loss` and leaves it out."""

  def metrics():
    added = [WeightedMeanLoss(loss_fn())] if loss_metric else []
    counters = [tff.learning.metrics.NumExamplesCounter(),
                tff.learning.metrics.NumBatchesCounter()]
    return collections.OrderedDict(
        (m.name, m) for m in list(metrics_fn()) + added + counters)

  return tff.learning.models.functional_model_from_keras(
      keras_model_fn, loss_fn(), input_spec=element_spec,
      metrics_constructor=metrics)


def derive_seed(*parts) -> int:
  """A 31-bit seed that is a pure function of `parts` (seed, round, client)."""
  digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
  return int.from_bytes(digest[:4], 'little') & 0x7FFFFFFF


def without_pipeline_rewrites(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` with tf.data's default graph rewrites, autotuning and private
  thread pool off.

  A client's stream is a few small batches, built once per round: rewriting
  and autotuning its pipeline cost more than they save (about 2 ms per client
  dataset in the TFF worker, half of a digits round's fixed cost; see
  docs/performance.md). And unless `private_threadpool_size` is negative
  (TensorFlow 2.14's `RootDataset`; tf.data documents sizes of 0 and more),
  every iterator of the dataset starts a thread pool of its own as it is
  made, as many threads as cores for the option left unset, and joins it
  when it is done: a pool per client per round. With no private pool, what
  a pipeline runs asynchronously (nothing in `client_batches`; a `map`
  with parallel calls in a user's `ClientData`) runs on the runner of the
  op that iterates it, the inter-op threads. A pool size the dataset's own
  options set is kept. The elements and their order are unchanged
  (tested).
  """
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  if dataset.options().threading.private_threadpool_size is None:
    options.threading.private_threadpool_size = -1
  return dataset.with_options(options)


def client_batches(dataset: tf.data.Dataset, *, batch_size: int,
                   num_batches: int, seed,
                   shuffle_buffer: int = 1000) -> tf.data.Dataset:
  """Shuffle (seeded), repeat, batch, take `num_batches` batches.

  Repeating before batching keeps every batch full; an empty client yields an
  empty stream. No prefetching: a client's few batches are consumed by one
  loop right away, and a prefetch buffer costs a thread per client per round.
  `seed` is an int or an int64 scalar tensor (the same stream
  for the same value: the worker-side pipeline of
  `perfed_tff.data.worker_datasets` passes it as a tensor).
  """
  return without_pipeline_rewrites(
      dataset.shuffle(shuffle_buffer, seed=seed,
                      reshuffle_each_iteration=True)
      .repeat()
      .batch(batch_size)
      .take(num_batches))


def sample_clients(client_ids: Sequence[str], num_clients: int, seed: int,
                   round_num: int) -> list[str]:
  """Clients of round `round_num`: a pure function of (seed, round)."""
  if num_clients > len(client_ids):
    raise ValueError(f'cannot sample {num_clients} clients from a population '
                     f'of {len(client_ids)}')
  rng = np.random.default_rng([seed, round_num])
  idx = rng.choice(len(client_ids), size=num_clients, replace=False)
  return [client_ids[i] for i in sorted(idx)]


def round_client_data(task: FederatedTask, *, clients_per_round: int,
                      num_batches: int, batch_size: int, seed: int,
                      round_num: int) -> tuple[list[str], list[tf.data.Dataset]]:
  """(client ids, batch streams) of one training round: a pure function of
  (seed, round), so every algorithm and every resumed run sees the same
  clients and batches; only `task.train` is read."""
  ids = sample_clients(task.client_ids, clients_per_round, seed, round_num)
  data = [client_batches(task.train.create_tf_dataset_for_client(cid),
                         batch_size=batch_size, num_batches=num_batches,
                         seed=derive_seed(seed, round_num, cid),
                         shuffle_buffer=task.shuffle_buffer)
          for cid in ids]
  return ids, data
