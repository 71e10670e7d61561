"""A run's task and the data of each of its rounds.

`load_task(config)` reads the run's dataset (its options checked by the
loader); the clients and batches of round r are a pure function of
(seed, r): the clients by `task.sample_clients`, each client's batch stream
shuffled by `task.derive_seed(seed, r, client)`. A process gets them as
datasets (`round_client_data`) or, composed with the worker-side batch
pipeline (`worker_side_process`, `perfed_tff.data.worker_datasets`), as
each client's examples and seed (`round_client_inputs`), from which the
worker builds the very same batches. `RoundDataSource` serves the same
rounds to TFF's program loops (`tff.learning.programs.train_model`).
"""

from __future__ import annotations

import json
from typing import Optional
import weakref

import numpy as np
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff.data import registry
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets

# A batch may repeat a small client's examples (the stream is repeated
# before batching, as the paper's fixed batch size needs on small users),
# but not beyond reason.
MAX_REPEATS_PER_BATCH = 64

# id(task) -> (weak reference to it, `_task_settings` of the config that
# `load_task` made it for).
_TASKS: dict = {}


def _task_settings(config) -> str:
  return json.dumps([config.dataset, dict(config.dataset_options),
                     config.cache_dir, config.seed], sort_keys=True,
                    default=repr)


def load_task(config) -> task_lib.FederatedTask:
  """The dataset's `FederatedTask` for `config.seed` (`config`: a
  `TrainingConfig`).

  Raises:
    checks.ArgumentError: a dataset option the loader rejects
      (`dataset_options`), or a dataset file that cannot be had (`cache_dir`).
  """
  try:
    task = registry.load_task(config.dataset, cache_dir=config.cache_dir,
                              seed=config.seed, **config.dataset_options)
  except (ValueError, TypeError) as e:
    if isinstance(e, checks.ArgumentError) and e.name in ('cache_dir',
                                                          'dataset_options'):
      raise
    flag = ('cache_dir' if isinstance(e, registry.DatasetUnavailableError)
            else 'dataset_options')
    raise checks.ArgumentError(flag, str(e).splitlines()[0].rstrip('.')) from e
  _TASKS[id(task)] = (weakref.ref(task), _task_settings(config))
  weakref.finalize(task, _TASKS.pop, id(task), None)
  return task


def loaded_for(task, config) -> bool:
  """Whether `task` was made by `load_task(config)`: its model is then a
  function of `config`'s settings (and its computations may be kept across
  runs)."""
  entry = _TASKS.get(id(task))
  return (entry is not None and entry[0]() is task
          and entry[1] == _task_settings(config))


def check_population(config, num_clients: int, task=None) -> None:
  """`clients_per_round` fits the population; with `task`, `batch_size` is
  at most MAX_REPEATS_PER_BATCH x the largest client's train data (when the
  sizes are known without reading the data, e.g. in-memory datasets).

  Raises:
    checks.ArgumentError: clients_per_round or batch_size out of range.
  """
  if config.clients_per_round > num_clients:
    raise checks.ArgumentError(
        'clients_per_round', 'must be between 1 and the population of '
        f'{config.dataset!r} ({num_clients} clients), got '
        f'{config.clients_per_round}')
  largest = None if task is None else _largest_client(task)
  limit = None if largest is None else MAX_REPEATS_PER_BATCH * largest
  if limit is not None and config.batch_size > limit:
    raise checks.ArgumentError(
        'batch_size', f'must be <= {limit} ({MAX_REPEATS_PER_BATCH} x {largest},'
        f' the most train examples a client of {config.dataset!r} holds), '
        f'got {config.batch_size}')


def _largest_client(task, limit: int = 2000) -> Optional[int]:
  """The most train examples of a client, when every dataset's cardinality
  is known (None otherwise, or for more than `limit` clients)."""
  ids = list(task.client_ids)
  if len(ids) > limit:
    return None
  largest = 0
  for cid in ids:
    n = int(task.train.create_tf_dataset_for_client(cid).cardinality())
    if n < 0:  # Unknown (a SQL-backed dataset): not checked.
      return None
    largest = max(largest, n)
  return largest


def batches_per_round(config) -> int:
  return algorithms.batches_per_round(config.algorithm, config.local_steps,
                                      inner_steps=config.inner_steps)


def round_client_data(config, task: task_lib.FederatedTask, round_num: int):
  """(client ids, batch streams) of round `round_num` (from 1): a pure
  function of (seed, round)."""
  return task_lib.round_client_data(
      task, clients_per_round=config.clients_per_round,
      num_batches=batches_per_round(config),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


def worker_side_process(config, task: task_lib.FederatedTask, process):
  """`process` composed with the worker-side batch pipeline
  (`perfed_tff.data.worker_datasets`): it takes `round_client_inputs`
  (examples and seeds) instead of datasets, builds the very same batches on
  the worker, and has `process`'s state. A process whose client data are
  not datasets is returned as it is (it takes `round_client_data`)."""
  if not worker_datasets.takes_datasets(process):
    return process
  return worker_datasets.compose(
      process, task.train.element_type_structure,
      batch_size=config.batch_size, num_batches=batches_per_round(config),
      shuffle_buffer=task.shuffle_buffer)


def round_client_inputs(config, task: task_lib.FederatedTask, round_num: int,
                        examples: Optional[
                            worker_datasets.ClientExamples] = None):
  """(client ids, inputs of a `worker_side_process`) of round `round_num`:
  the clients and batches of `round_client_data`."""
  return worker_datasets.round_client_inputs(
      task, examples, clients_per_round=config.clients_per_round,
      seed=config.seed, round_num=round_num)


# What `tff.learning.programs.train_model` takes as its data source.


class RoundDataIterator(tff.program.FederatedDataSourceIterator):
  """Round r's clients and batches, a pure function of (seed, r)
  (`perfed_tff.data.task.round_client_data`, as the project's training
  program samples them); its whole state is the next round number."""

  def __init__(self, source: 'RoundDataSource', round_num: int = 1):
    self._source = source
    self.round_num = int(round_num)

  @property
  def federated_type(self) -> tff.FederatedType:
    return self._source.federated_type

  def select(self, k: Optional[int] = None):
    """The datasets of `k` clients sampled for the next round."""
    source = self._source
    _, datasets = task_lib.round_client_data(
        source.task, clients_per_round=k or source.clients_per_round,
        num_batches=source.num_batches, batch_size=source.batch_size,
        seed=source.seed, round_num=self.round_num)
    self.round_num += 1
    return datasets

  def to_bytes(self) -> bytes:
    return np.int64(self.round_num).tobytes()

  def __deepcopy__(self, memo) -> 'RoundDataIterator':
    # train_model copies iterators; the source (task data) is shared.
    return RoundDataIterator(self._source, self.round_num)

  @classmethod
  def from_bytes(cls, buffer: bytes) -> 'RoundDataIterator':
    raise NotImplementedError('use RoundDataSource.iterator_from_bytes')

  def restored(self, buffer: bytes) -> 'RoundDataIterator':
    """The iterator of `to_bytes`' `buffer`, over this one's source."""
    return self._source.iterator_from_bytes(buffer)

  def __eq__(self, other) -> bool:
    return (isinstance(other, RoundDataIterator)
            and other.round_num == self.round_num
            and other._source is self._source)  # pylint: disable=protected-access


class RoundDataSource(tff.program.FederatedDataSource):
  """A `tff.program.FederatedDataSource` over a
  `perfed_tff.data.task.FederatedTask`: every round, `clients_per_round`
  clients, each with `num_batches` batches of `batch_size` of its shuffled
  train data (use `perfed_tff.algorithms.batches_per_round`)."""

  def __init__(self, task, *, clients_per_round: int, num_batches: int,
               batch_size: int, seed: int = 0):
    self.task = task
    self.clients_per_round = checks.integer('clients_per_round',
                                            clients_per_round, 1)
    self.num_batches = checks.integer('num_batches', num_batches, 1)
    self.batch_size = checks.integer('batch_size', batch_size, 1)
    self.seed = seed
    self._federated_type = tff.FederatedType(
        tff.SequenceType(tff.types.tensorflow_to_type(task.element_spec)),
        tff.CLIENTS)

  @property
  def federated_type(self) -> tff.FederatedType:
    return self._federated_type

  def iterator(self) -> RoundDataIterator:
    return RoundDataIterator(self)

  def iterator_from_bytes(self, buffer: bytes) -> RoundDataIterator:
    return RoundDataIterator(self, int(np.frombuffer(buffer, np.int64)[0]))
