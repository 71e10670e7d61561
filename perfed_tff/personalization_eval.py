"""Personalized evaluation (the paper's protocol) as a TFF computation.

For each evaluation client, starting from the global model w:

  step 0:  loss and accuracy of w on the client's *test* data;
  step k:  w_k = w_{k-1} - alpha * g_{B_k}(w_{k-1}), where B_1, B_2, ... are the
           client's *train* batches in order (k = 1 is the paper's "one step of
           stochastic gradient on the user's data"); loss and accuracy of w_k on
           the client's test data, for every k in `adaptation_steps`.

Adaptation never reads the test data: the computation takes
`OrderedDict(train_data=..., test_data=...)` per client, the SGD steps
iterate `train_data` only, and `test_data` is only ever passed to the metric
loop. Which data the caller puts into `train_data` (the client's train split,
or, for the paper's protocol as it is quoted, a batch of its test split) is
the driver's choice: `perfed_tff.program.population_eval` prepares the
client inputs from `ClientData`, runs the computation on a population and
summarizes it (client mean, example-weighted mean, percentiles).

`build_personalized_evaluation` returns a `PersonalizedEvaluation`: its
federated computation

  (ModelWeights@SERVER, alpha@SERVER,
   {OrderedDict(train_data=B*, test_data=B*)}@CLIENTS)
      -> {per-client metrics}@CLIENTS

and the settings it was built with (adaptation steps, input format, batch
size), so the per-client numbers come back to Python, one entry per client.
Every algorithm (FedAvg, Per-FedAvg FO/HF/MAML) is evaluated by the same code
from its global `ModelWeights` (`process.get_model_weights(state)`). The step
size alpha is an argument of the computation (a float32 at the server), so
one traced evaluation serves every alpha: the training program passes the
alpha in the process state (`process.get_hparams(state)`, which
`set_hparams` changes), and the run's `alpha` for FedAvg, whose state has
none.

Inside the computation the client's test batches are read once and
concatenated, so every measurement is one forward pass (iterating a dataset
inside TFF's runtime costs far more than the small models evaluated here; this
made evaluation ~15x faster). Adaptation steps run with `training=True` (the
model's own loss), measurements with `training=False`.

Awkward clients are measured as far as they can be, never a crash, for every
model: a client without test examples is not measured (the model never sees
an empty batch, which TensorFlow's oneDNN convolution gets wrong); its
metrics are 0 with `num_test_examples` 0 (the driver's summary leaves it
out and counts it in `num_clients_empty`). A client without train examples takes no
step (an empty train batch is no step either): its step-k metrics are those
of the global model, its personalized model, counted in
`num_clients_without_step`. A client with one train example steps on batches
of that example (`task.client_batches` repeats before batching), i.e. on its
gradient.

Accuracy is argmax(predictions, -1) == label, averaged over label entries, so it
also covers per-token accuracy of sequence models; `ignore_label` (e.g.
Shakespeare's pad id 0) leaves a label value out. The loss is the model's loss
on all the client's test examples at once.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import model_oracles
from perfed_tff import process_arguments as args_lib
from perfed_tff.models import specs

def _check_steps(adaptation_steps) -> tuple[int, ...]:
  if isinstance(adaptation_steps, numbers.Integral):
    adaptation_steps = (adaptation_steps,)
  steps = tuple(adaptation_steps)
  if not steps or any(isinstance(k, bool) or not isinstance(k, numbers.Integral)
                      or k < 1 for k in steps):
    raise ValueError('`adaptation_steps` must be integers >= 1, got '
                     f'{adaptation_steps!r}.')
  return tuple(sorted(set(int(k) for k in steps)))


def step_key(k: int) -> str:
  """Name of the metrics after k adaptation steps ('step_0' = no adaptation)."""
  return f'step_{k}'


def _concatenate(dataset: tf.data.Dataset):
  """All batches of `dataset` concatenated along axis 0 (one structure);
  an empty dataset gives [0, ...] tensors. Needs batches whose dimensions
  other than the first are known."""
  initial = tf.nest.map_structure(
      lambda s: tf.zeros([0] + s.shape[1:].as_list(), s.dtype),
      dataset.element_spec)
  return dataset.reduce(initial, lambda acc, batch: tf.nest.map_structure(
      lambda a, b: tf.concat([a, b], axis=0), acc, batch))


def _batch_metrics(model, batch, ignore_label=None):
  """(sum of per-example loss, correct predictions, label entries, examples)."""
  out = model.forward_pass(batch, training=False)
  _, y = model_oracles.split_batch(batch)
  return _metrics_of(out.predictions, out.loss, y, ignore_label)


def _metrics_of(predictions, mean_loss, y, ignore_label=None):
  """`_batch_metrics` from the predictions and mean loss of one batch."""
  num_examples = tf.cast(tf.shape(predictions)[0], tf.float32)
  labels = tf.reshape(tf.cast(y, tf.int64), tf.shape(predictions)[:-1])
  correct = tf.cast(tf.equal(tf.argmax(predictions, axis=-1), labels),
                    tf.float32)
  if ignore_label is None:
    entries = tf.cast(tf.size(correct), tf.float32)
  else:
    mask = tf.cast(tf.not_equal(labels, ignore_label), tf.float32)
    correct *= mask
    entries = tf.reduce_sum(mask)
  # The model's loss is a mean over the batch (here: all the client's test
  # examples); the sum is divided by the example count again by the caller.
  loss = tf.cast(mean_loss, tf.float32) * num_examples
  return (tf.where(num_examples > 0, loss, 0.0), tf.reduce_sum(correct),
          entries, num_examples)


_EVAL_BATCH = 256


def _prepare(data, *, unbatched: bool, batch_size: Optional[int],
             max_steps: int):
  """(train batches, test batches) of a client input. Unbatched input (TFF's
  `build_personalization_eval_computation` structure) is batched here: the
  train examples in order into batches of `batch_size` (None: k full-batch
  steps on all of them), the test examples in any batches."""
  train, test = data['train_data'], data['test_data']
  if not unbatched:
    return train, test
  if batch_size is None:
    train = train.batch(_FULL_BATCH).repeat(max_steps).take(max_steps)
  else:
    train = train.batch(batch_size)
  return train, test.batch(_EVAL_BATCH)


_FULL_BATCH = 2**31 - 1


def build_client_evaluation(model_fn, model_weights_type, data_type, *,
                            adaptation_steps: Sequence[int],
                            ignore_label: Optional[int] = None,
                            unbatched: bool = False,
                            batch_size: Optional[int] = None,
                            ) -> tff.Computation:
  """The per-client `tff.tensorflow.computation(weights, alpha, data) ->
  metrics` (alpha: the adaptation steps' float32 step size).

  `data` is `OrderedDict(train_data=batches, test_data=batches)`, or with
  `unbatched=True` the same of single examples (batched here by
  `batch_size`). The k-th adaptation step uses the k-th train batch; a client
  whose train batches run out stops adapting (its later steps repeat the last
  weights) and reports how many steps it took in `num_adaptation_steps` (an
  empty batch is no step). A client without test examples is not measured:
  loss and accuracy 0, `num_test_examples` 0 (see `_adapt_and_measure`).
  `model_fn` is a no-arg callable returning a VariableModel or a
  `tff.learning.models.FunctionalModel`.
  """
  steps = _check_steps(adaptation_steps)
  max_steps = steps[-1]
  if isinstance(model_fn, tff.learning.models.FunctionalModel):
    return _build_functional_client_evaluation(
        model_fn, model_weights_type, data_type, steps=steps,
        ignore_label=ignore_label, unbatched=unbatched,
        batch_size=batch_size)

  @tff.tensorflow.computation(model_weights_type, np.float32, data_type)
  @tf.autograph.experimental.do_not_convert
  def client_eval(weights, alpha, data):
    model = model_fn()
    oracle = model_oracles.VariableOracle(model)
    variables = tuple(model.trainable_variables)

    def evaluate(trainable, test_batches):
      # One forward pass over all the client's test examples (read once), at
      # the weights `trainable`.
      for v, w in zip(variables, trainable):
        v.assign(w)
      l, c, e, n = _batch_metrics(model, test_batches, ignore_label)
      return collections.OrderedDict(
          loss=tf.math.divide_no_nan(l, n),
          accuracy=tf.math.divide_no_nan(c, e)), n

    @tf.function(autograph=False)
    def run(weights, train_data, test_data):
      # Inside tf.function, so automatic control dependencies order every
      # assignment before the reads that follow it.
      weights.assign_weights_to(model)
      return _adapt_and_measure(
          tuple(weights.trainable), train_data, test_data, evaluate=evaluate,
          step=lambda w, batch: model_oracles.sgd_step(oracle, w, batch,
                                                       alpha),
          max_steps=max_steps, steps=steps)

    train_data, test_data = _prepare(data, unbatched=unbatched,
                                     batch_size=batch_size,
                                     max_steps=max_steps)
    return run(weights, train_data, test_data)

  return client_eval


def _adapt_and_measure(state, train_data, test_data, *, evaluate, step,
                       max_steps, steps):
  """The adaptation loop of both model kinds (traced inside a tf.function;
  written with tf.while_loop / tf.cond, so no AutoGraph is needed).

  `evaluate(state, test_batches) -> (metrics, num_examples)` measures the
  adapted model; `step(state, batch) -> (state, batch_size)` takes one SGD
  step at alpha. The client's test batches are read once and concatenated;
  one graph loop over k = 1..max_steps measures after every step (a forward
  pass on the test tensors) and keeps the requested ones.

  Awkward clients never reach the model with zero examples: a client without
  test examples is not measured (no forward pass; its metrics are 0 and
  `num_test_examples` 0, and `summarize` leaves it out), and a train batch
  without examples (as well as no train batch at all) is no step. A forward
  pass on an empty batch is not safe: TensorFlow's oneDNN fused Conv2D
  kernel (CPU) returns its *input* unchanged for an empty batch, so the
  EMNIST CNN's second convolution fails with "input depth must be evenly
  divisible by filter depth: 1 vs 32".
  """
  test_batches = _concatenate(test_data)
  num_test = tf.shape(tf.nest.flatten(test_batches)[0], out_type=tf.int64)[0]
  has_test = num_test > 0

  def measure(state):
    return tf.cond(has_test, lambda: evaluate(state, test_batches)[0],
                   _no_metrics)

  before = measure(state)
  iterator = iter(train_data)

  def body(k, state, taken, used, losses, accuracies):
    optional = iterator.get_next_as_optional()

    def adapt():
      batch = optional.get_value()
      size = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]

      def take_step():
        new_state, n = step(state, batch)
        return new_state, taken + 1, used + n

      return tf.cond(size > 0, take_step, lambda: (state, taken, used))

    state, taken, used = tf.cond(optional.has_value(), adapt,
                                 lambda: (state, taken, used))
    after = measure(state)
    return (k + 1, state, taken, used, losses.write(k, after['loss']),
            accuracies.write(k, after['accuracy']))

  zero = tf.constant(0, tf.int64)
  _, state, taken, used, losses, accuracies = tf.while_loop(
      lambda k, *_: k < max_steps, body,
      (tf.constant(0), state, zero, zero,
       tf.TensorArray(tf.float32, size=max_steps),
       tf.TensorArray(tf.float32, size=max_steps)))
  return _collect(before, num_test, losses.stack(), accuracies.stack(),
                  taken, used, steps)


def _no_metrics() -> collections.OrderedDict:
  """The metrics of a client without test examples: loss 0 and accuracy 0
  (what dividing by its zero counts gave; `summarize` leaves it out)."""
  return collections.OrderedDict(loss=tf.constant(0.0, tf.float32),
                                 accuracy=tf.constant(0.0, tf.float32))


def _collect(before, num_test, losses, accuracies, taken, used, steps):
  metrics = collections.OrderedDict()
  metrics[step_key(0)] = before
  for k in steps:
    metrics[step_key(k)] = collections.OrderedDict(
        loss=losses[k - 1], accuracy=accuracies[k - 1])
  return collections.OrderedDict(
      num_test_examples=tf.cast(num_test, tf.int64),
      num_adaptation_steps=taken,
      num_adaptation_examples=used,
      metrics=metrics)


def _build_functional_client_evaluation(model, model_weights_type, data_type,
                                        *, steps, ignore_label,
                                        unbatched, batch_size):
  """`build_client_evaluation` for a `tff.learning.models.FunctionalModel`:
  the same steps w_k = w_{k-1} - alpha g_{B_k}(w_{k-1}) on explicit weights."""
  max_steps = steps[-1]

  @tff.tensorflow.computation(model_weights_type, np.float32, data_type)
  @tf.autograph.experimental.do_not_convert
  def client_eval(weights, alpha, data):
    non_trainable = tuple(weights.non_trainable)
    oracle = model_oracles.FunctionalOracle(model, non_trainable)

    def evaluate(trainable, test_batches):
      x, y = model_oracles.split_batch(test_batches)
      predictions = model.predict_on_batch((trainable, non_trainable), x,
                                           False)
      loss = model.loss(output=predictions, label=y)
      l, c, e, n = _metrics_of(predictions, loss, y, ignore_label)
      return collections.OrderedDict(
          loss=tf.math.divide_no_nan(l, n),
          accuracy=tf.math.divide_no_nan(c, e)), n

    @tf.function(autograph=False)
    def run(trainable, train_data, test_data):
      return _adapt_and_measure(
          trainable, train_data, test_data, evaluate=evaluate,
          step=lambda w, batch: model_oracles.sgd_step(oracle, w, batch,
                                                       alpha),
          max_steps=max_steps, steps=steps)

    train_data, test_data = _prepare(data, unbatched=unbatched,
                                     batch_size=batch_size,
                                     max_steps=max_steps)
    return run(tuple(weights.trainable), train_data, test_data)

  return client_eval


INPUT_FORMATS = ('batched', 'unbatched')


@dataclasses.dataclass(frozen=True, eq=False)
class PersonalizedEvaluation:
  """A personalized evaluation: its TFF computation and its settings.

  Attributes:
    computation: `(ModelWeights@SERVER, float32 alpha@SERVER,
      {OrderedDict(train_data=..., test_data=...)}@CLIENTS) -> {per-client
      metrics}@CLIENTS` (see `build_personalized_evaluation`).
    adaptation_steps: the k measured besides step 0, sorted.
    input_format: 'batched' or 'unbatched' (see
      `build_personalized_evaluation`).
    batch_size: the adaptation batch of 'unbatched' input (None: full
      batch); None for 'batched' input.
    worker_side: the computations that take each client's examples instead
      of datasets, by (adaptation batch size, evaluation batch size)
      (`perfed_tff.personalization_data.worker_side_evaluation`).
  """
  computation: tff.Computation
  adaptation_steps: tuple
  input_format: str = 'batched'
  batch_size: Optional[int] = None
  worker_side: dict = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'adaptation_steps',
                       _check_steps(self.adaptation_steps))
    checks.choice('input_format', self.input_format, INPUT_FORMATS)

  @property
  def type_signature(self):
    return self.computation.type_signature

  def __call__(self, model_weights, alpha, client_data):
    """The per-client metrics of `client_data` (a list, one entry per client)
    after steps at `alpha` (`checks.step_size`) from `model_weights`."""
    alpha = checks.step_size('alpha', alpha)
    return self.computation(model_weights, np.float32(alpha), client_data)


def build_personalized_evaluation(model_fn,
                                  *,
                                  adaptation_steps: Sequence[int] | int = (1,),
                                  ignore_label: Optional[int] = None,
                                  input_format: str = 'batched',
                                  batch_size: Optional[int] = None,
                                  ) -> PersonalizedEvaluation:
  """Builds the personalized evaluation of Per-FedAvg (Fallah et al., 2020).

  From the global model w, per client: w_k = w_{k-1} - alpha g_{B_k}(w_{k-1})
  on the client's train batches B_1, B_2, ..., and the loss and accuracy of
  w_0 = w and of every requested w_k on the client's test data. alpha is an
  argument of every call (the paper: the same alpha as Per-FedAvg's inner
  step; `process.get_hparams(state)['client_work']['alpha']`).

  Args:
    model_fn: no-arg callable returning a `tff.learning.models.VariableModel`,
      or a `tff.learning.models.FunctionalModel` (the same `model_fn` the
      algorithms were trained with).
    adaptation_steps: k values (ints >= 1) after which to measure; 1 is the
      paper's protocol. Step 0 (the global model) is always measured.
    ignore_label: label value left out of the accuracy (e.g. the padding id
      0 of Shakespeare); None counts every label entry.
    input_format: 'batched' (each client's `train_data`/`test_data` are
      datasets of batches; B_k is the k-th train batch) or 'unbatched'
      (TFF's `tff.learning.algorithms.build_personalization_eval_computation`
      client input: datasets of single examples; B_k is the k-th batch of
      `batch_size` train examples in order).
    batch_size: with 'unbatched', the adaptation batch size (None: every
      step is a full-batch step on all the client's train examples).

  Returns:
    A `PersonalizedEvaluation`; its computation has type signature
    `(ModelWeights@SERVER, float32@SERVER, {OrderedDict(train_data=B*,
    test_data=B*)}@CLIENTS) -> {OrderedDict(num_test_examples,
    num_adaptation_steps, num_adaptation_examples,
    metrics=OrderedDict(step_k=OrderedDict(loss, accuracy) for k in (0,) +
    adaptation_steps))}@CLIENTS`. Called, with (weights, alpha, client
    data), it returns a list with one such structure per client.
  """
  steps = _check_steps(adaptation_steps)
  input_format = checks.choice('input_format', input_format, INPUT_FORMATS)
  if batch_size is not None:
    batch_size = checks.integer('batch_size', batch_size, 1)
  if isinstance(model_fn, tff.learning.models.FunctionalModel):
    input_spec = model_fn.input_spec
  else:
    with tf.Graph().as_default():
      input_spec = model_fn().input_spec
  if input_format == 'unbatched':
    input_spec = specs.unbatched_spec(input_spec)
  element_type = tff.types.tensorflow_to_type(input_spec)
  data_type = tff.types.StructWithPythonType(
      [('train_data', tff.SequenceType(element_type)),
       ('test_data', tff.SequenceType(element_type))],
      collections.OrderedDict)

  initial_weights = args_lib.initial_model_weights_computation(model_fn)
  model_weights_type = initial_weights.type_signature.result
  client_eval = build_client_evaluation(
      model_fn, model_weights_type, data_type, adaptation_steps=steps,
      ignore_label=ignore_label, unbatched=input_format == 'unbatched',
      batch_size=batch_size)

  @tff.federated_computation(
      tff.FederatedType(model_weights_type, tff.SERVER),
      tff.FederatedType(np.float32, tff.SERVER),
      tff.FederatedType(data_type, tff.CLIENTS))
  def personalized_evaluation(weights, alpha, client_data):
    return tff.federated_map(
        client_eval, (tff.federated_broadcast(weights),
                      tff.federated_broadcast(alpha), client_data))

  return PersonalizedEvaluation(
      personalized_evaluation, steps, input_format=input_format,
      batch_size=batch_size if input_format == 'unbatched' else None)
