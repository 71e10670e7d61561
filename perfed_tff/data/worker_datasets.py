"""Client datasets built on the TFF worker from each client's examples.

Handing `LearningProcess.next` one `tf.data.Dataset` per client makes TFF
serialize every dataset's graph in this process and import it again in the
worker, every round. Here a client's round input is instead its examples as
tensors plus its round seed, `OrderedDict(examples=..., seed=int64)`, and a
`tff.tensorflow.computation` builds the very same batch stream on the worker
(`task.client_batches` with the seed as a tensor). TFF composes it with any
`LearningProcess` (`tff.simulation.compose_dataset_computation_with_learning_process`),
so the process itself, its state and its checkpoints are unchanged, and the
batches are identical to the Python-side ones (tests check the weights).

The seed of client c in round r is `task.derive_seed(seed, r, c)`, as before;
the examples of the clients seen recently are kept in a bounded cache
(`ClientExamples`), so a round reads each client's data at most once.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence
import weakref

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.data import task as task_lib

# Bytes of client examples one `ClientExamples` keeps by default (least
# recently used clients are dropped first).
DEFAULT_CACHE_BYTES = 128 * 2**20
# Examples read per tf.data batch: tf.data allocates a whole batch up front,
# so a client is read fastest (and without heap churn) in small chunks: 23-26
# ms per EMNIST client at 1-64, 71 ms at 1,024, 170 ms at 4,096 (the trainer
# also grew by about 3 MiB a round reading new clients at 4,096).
_READ_CHUNK = 64


def examples_type(element_spec) -> tff.Type:
  """TFF type of a client's stacked examples: every leaf of the unbatched
  `element_spec` with a leading dimension of any size."""
  return tff.types.tensorflow_to_type(tf.nest.map_structure(
      lambda s: tf.TensorSpec([None] + s.shape.as_list(), s.dtype),
      element_spec))


def input_type(element_spec) -> tff.Type:
  """TFF type of one client's round input: `<examples=..., seed=int64>`."""
  return tff.types.to_type(collections.OrderedDict(
      examples=examples_type(element_spec), seed=np.int64))


class ClientExamples:
  """`cache(client_id)`: the client's examples of `client_data` as numpy
  arrays stacked along a new leading axis (length 0 for an empty client).

  The most recently used clients are kept while they fit in `max_bytes`
  (memory stays bounded over any number of rounds and clients).
  """

  def __init__(self, client_data: tff.simulation.datasets.ClientData,
               max_bytes: int = DEFAULT_CACHE_BYTES):
    self._client_data = client_data
    self._open = dataset_reader(client_data)
    self._spec = client_data.element_type_structure
    self._max_bytes = max_bytes
    self._cache = collections.OrderedDict()
    self._bytes = 0

  @property
  def element_spec(self):
    return self._spec

  def _read(self, client_id: str):
    dataset = self._open(client_id)
    size = int(dataset.cardinality())
    if size > 0:  # Known (in-memory data): one batch of exactly that size,
      # 0.3 ms a read on digits against 2.7 ms in chunks.
      return tf.nest.map_structure(lambda t: t.numpy(),
                                   dataset.batch(size).get_single_element())
    # Unknown size: chunks of bounded size (tf.data reserves room for a
    # whole batch).
    chunks = [tf.nest.map_structure(lambda t: t.numpy(), b)
              for b in dataset.batch(_READ_CHUNK)]
    if not chunks:
      return tf.nest.map_structure(
          lambda s: np.zeros([0] + s.shape.as_list(), s.dtype.as_numpy_dtype),
          self._spec)
    if len(chunks) == 1:
      return chunks[0]
    return tf.nest.map_structure(lambda *a: np.concatenate(a), *chunks)

  def __call__(self, client_id: str):
    hit = self._cache.pop(client_id, None)
    if hit is None:
      hit = self._read(client_id)
      self._bytes += _nbytes(hit)
    self._cache[client_id] = hit
    while self._bytes > self._max_bytes and len(self._cache) > 1:
      _, dropped = self._cache.popitem(last=False)
      self._bytes -= _nbytes(dropped)
    return hit


def dataset_reader(client_data: tff.simulation.datasets.ClientData):
  """`open(client_id) -> tf.data.Dataset` of `client_data`, traced once.

  `create_tf_dataset_for_client` builds the client's pipeline eagerly, and
  every eager `Dataset.map` registers its traced function in TensorFlow's
  context for good: about 180 KB per call on EMNIST, so a long run over a
  large population grew by hundreds of MB. Here the client id is a string
  tensor of one `tf.function` (TFF requires `serializable_dataset_fn` to be
  traceable), so the pipeline's functions are traced once. A `ClientData`
  whose dataset function cannot be traced is read eagerly, and so is an
  in-memory `tff.simulation.datasets.TestClientData` (its eager read maps
  nothing, so it registers no function, while its traceable dataset
  function holds every client's tensors: 0.7 s to trace and 25 ms a read on
  the digits task, against 0.2 ms eagerly).
  """
  if isinstance(client_data, tff.simulation.datasets.TestClientData):
    return client_data.create_tf_dataset_for_client
  try:
    traced = tf.function(client_data.serializable_dataset_fn,
                         input_signature=[tf.TensorSpec([], tf.string)],
                         autograph=False)
    traced.get_concrete_function()
  except Exception:  # pylint: disable=broad-except
    # No traceable dataset function (a user's ClientData): read eagerly.
    return client_data.create_tf_dataset_for_client
  return lambda client_id: traced(tf.constant(client_id, tf.string))


def _nbytes(structure) -> int:
  return sum(a.nbytes for a in tf.nest.flatten(structure))


_SHARED = weakref.WeakKeyDictionary()


def client_examples(client_data: tff.simulation.datasets.ClientData
                    ) -> ClientExamples:
  """The `ClientExamples` of `client_data` shared by every user in this
  process (training rounds, evaluations, the runs of a comparison), for as
  long as `client_data` lives."""
  cache = _SHARED.get(client_data)
  if cache is None:
    cache = _SHARED[client_data] = ClientExamples(client_data)
  return cache


def build_batches_computation(element_spec, *, batch_size: int,
                              num_batches: int,
                              shuffle_buffer: int = 1000) -> tff.Computation:
  """`<examples, seed> -> batch stream`: `task.client_batches` on the worker."""

  @tff.tensorflow.computation(input_type(element_spec))
  def client_batches(client_input):
    return task_lib.client_batches(
        tf.data.Dataset.from_tensor_slices(client_input['examples']),
        batch_size=batch_size, num_batches=num_batches,
        seed=client_input['seed'], shuffle_buffer=shuffle_buffer)

  return client_batches


def client_input(examples, seed: int) -> collections.OrderedDict:
  return collections.OrderedDict(examples=examples, seed=np.int64(seed))


def round_inputs(examples: ClientExamples, client_ids: Sequence[str], *,
                 seed: int, round_num: int) -> list:
  """The round inputs of `client_ids` in round `round_num`: each client's
  examples and its seed `task.derive_seed(seed, round_num, client)`."""
  return [client_input(examples(cid),
                       task_lib.derive_seed(seed, round_num, cid))
          for cid in client_ids]


def takes_datasets(process) -> bool:
  """Whether `process.next` is a TFF computation whose client data are
  `tf.data.Dataset`s (so that it can be `compose`d)."""
  signature = getattr(process.next, 'type_signature', None)
  parameter = getattr(signature, 'parameter', None)
  if not isinstance(parameter, tff.StructType) or len(parameter) < 2:
    return False
  return isinstance(getattr(parameter[1], 'member', None), tff.SequenceType)


def compose(process: tff.learning.templates.LearningProcess,
            element_spec, *, batch_size: int, num_batches: int,
            shuffle_buffer: int = 1000
            ) -> tff.learning.templates.LearningProcess:
  """`process` taking `round_inputs(...)` instead of datasets (TFF's
  `compose_dataset_computation_with_learning_process`); initialize, state,
  `get_model_weights` and hparams are `process`'s own."""
  return tff.simulation.compose_dataset_computation_with_learning_process(
      build_batches_computation(element_spec, batch_size=batch_size,
                                num_batches=num_batches,
                                shuffle_buffer=shuffle_buffer),
      process)


def round_client_inputs(task: task_lib.FederatedTask,
                        examples: Optional[ClientExamples] = None, *,
                        clients_per_round: int, seed: int, round_num: int
                        ) -> tuple[list[str], list]:
  """(client ids, round inputs) of one training round: the clients of
  `task.round_client_data` (a pure function of (seed, round)) and their
  inputs for a `compose`d process."""
  examples = examples or client_examples(task.train)
  ids = task_lib.sample_clients(task.client_ids, clients_per_round, seed,
                                round_num)
  return ids, round_inputs(examples, ids, seed=seed, round_num=round_num)
