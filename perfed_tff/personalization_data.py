"""What the personalized evaluation reads: the protocols, each client's
adaptation and test batches, and the evaluation that builds them on the TFF
worker from the client's examples.

Protocols (`PROTOCOLS`): 'heldout' adapts on the user's *train* data, so the
train split is the only data the adaptation reads; 'paper' takes the
test-time step on a batch of the user's *test* data, then measures on that
test data (the paper's own evaluation as it is quoted, with its leak;
labelled as such). The adaptation batches of user c are seeded by
`task.derive_seed(seed, 'personalization', c)`, the same for every algorithm.
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import personalization_eval
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets

PROTOCOLS = ('heldout', 'paper')
# Test examples per batch when the evaluation measures a model.
EVAL_BATCH_SIZE = 256


def check_protocol(protocol: str, name: str = 'eval_protocols') -> str:
  return checks.choice(name, protocol, PROTOCOLS)


def adaptation_seed(seed: int, client_id: str) -> int:
  """The seed of user `client_id`'s adaptation batches."""
  return task_lib.derive_seed(seed, 'personalization', client_id)


def num_examples(dataset: tf.data.Dataset) -> int:
  return int(dataset.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def adaptation_batches(train_dataset: tf.data.Dataset, *, num_steps: int,
                       batch_size: Optional[int], seed: int,
                       shuffle_buffer: int = 1000) -> tf.data.Dataset:
  """The batches of the k adaptation steps, from the client's *train* data.

  batch_size=None: every step is a full-batch gradient step on all the
  client's train examples; otherwise steps take seeded stochastic batches
  (`task.client_batches`, the same stream the training clients see).
  """
  if batch_size is None:
    n = num_examples(train_dataset)
    return _full_batch_steps(train_dataset, max(n, 1), num_steps)
  return task_lib.client_batches(train_dataset, batch_size=batch_size,
                                 num_batches=num_steps, seed=seed,
                                 shuffle_buffer=shuffle_buffer)


def _full_batch_steps(train_dataset, size, num_steps):
  """`num_steps` batches, each all `size` examples of `train_dataset`."""
  return task_lib.without_pipeline_rewrites(
      train_dataset.batch(size).repeat(num_steps).take(num_steps))


def client_input(train_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset,
                 *, num_steps: int, adapt_batch_size: Optional[int],
                 seed: int, eval_batch_size: int = EVAL_BATCH_SIZE
                 ) -> collections.OrderedDict:
  """`OrderedDict(train_data=adaptation batches, test_data=test batches)`."""
  return collections.OrderedDict(
      train_data=adaptation_batches(train_dataset, num_steps=num_steps,
                                    batch_size=adapt_batch_size, seed=seed),
      test_data=task_lib.without_pipeline_rewrites(
          test_dataset.batch(eval_batch_size)))


def build_worker_side_evaluation(
    evaluation: personalization_eval.PersonalizedEvaluation, element_spec,
    *, adapt_batch_size: Optional[int],
    eval_batch_size: int = EVAL_BATCH_SIZE,
    shuffle_buffer: int = 1000) -> tff.Computation:
  """`evaluation`'s computation (batched input) taking each client's
  examples instead of datasets: `(weights@SERVER, alpha@SERVER,
  {<adapt=examples, test=examples, seed=int64>}@CLIENTS)`, with
  `client_input`'s batches built on the worker
  (`perfed_tff.data.worker_datasets`; the same batches)."""
  steps = max(evaluation.adaptation_steps)
  examples = worker_datasets.examples_type(element_spec)

  @tff.tensorflow.computation(collections.OrderedDict(
      adapt=examples, test=examples, seed=np.int64))
  def client_datasets(inputs):
    train = tf.data.Dataset.from_tensor_slices(inputs['adapt'])
    if adapt_batch_size is None:
      size = tf.shape(tf.nest.flatten(inputs['adapt'])[0],
                      out_type=tf.int64)[0]
      train_data = _full_batch_steps(train, tf.maximum(size, 1), steps)
    else:
      train_data = task_lib.client_batches(
          train, batch_size=adapt_batch_size, num_batches=steps,
          seed=inputs['seed'], shuffle_buffer=shuffle_buffer)
    test = tf.data.Dataset.from_tensor_slices(inputs['test'])
    return collections.OrderedDict(
        train_data=train_data,
        test_data=task_lib.without_pipeline_rewrites(
            test.batch(eval_batch_size)))

  signature = evaluation.type_signature
  weights_type, alpha_type = signature.parameter[0], signature.parameter[1]
  inner = evaluation.computation

  @tff.federated_computation(weights_type, alpha_type, tff.FederatedType(
      client_datasets.type_signature.parameter, tff.CLIENTS))
  def worker_side_evaluation(weights, alpha, client_inputs):
    return inner(weights, alpha, tff.federated_map(client_datasets,
                                                   client_inputs))

  return worker_side_evaluation


def worker_side_evaluation(
    evaluation: personalization_eval.PersonalizedEvaluation, element_spec,
    *, adapt_batch_size: Optional[int],
    eval_batch_size: int = EVAL_BATCH_SIZE) -> tff.Computation:
  """`build_worker_side_evaluation` of `evaluation` for these batch sizes,
  built once and kept in `evaluation.worker_side`."""
  key = (adapt_batch_size, eval_batch_size)
  if key not in evaluation.worker_side:
    evaluation.worker_side[key] = build_worker_side_evaluation(
        evaluation, element_spec, adapt_batch_size=adapt_batch_size,
        eval_batch_size=eval_batch_size)
  return evaluation.worker_side[key]
