"""Personalized evaluation (the paper's protocol) as a TFF computation.

For each evaluation client, starting from the global model w:

  step 0:  loss and accuracy of w on the client's *test* data;
  step k:  w_k = w_{k-1} - alpha * g_{B_k}(w_{k-1}), where B_1, B_2, ... are the
           client's *train* batches in order (k = 1 is the paper's "one step of
           stochastic gradient on the user's data"); loss and accuracy of w_k on
           the client's test data, for every k in `adaptation_steps`.

Adaptation never reads the test data (protocol 'heldout', the default): the
computation takes `OrderedDict(train_data=..., test_data=...)` per client, the
SGD steps iterate `train_data` only, and `test_data` is only ever passed to
the metric loop. Protocol 'paper' is the paper's own evaluation as it is
quoted (the test-time step on a batch of the user's *test* data, then the
test data): `evaluate_population(..., protocol='paper')` builds the
adaptation batches from the test split instead, so the train split is not
read at all; results under it are labelled as such wherever they appear.

`build_personalized_evaluation` returns a federated computation

  (ModelWeights@SERVER, {OrderedDict(train_data=B*, test_data=B*)}@CLIENTS)
      -> {per-client metrics}@CLIENTS

so the per-client numbers come back to Python (a list, one entry per client)
and `summarize` computes the client mean (each client counts once), the
example-weighted mean and percentiles there. `evaluate_population` prepares the
client inputs from `ClientData` (seeded train batches, the full test set) and
runs it. Every algorithm (FedAvg, Per-FedAvg FO/HF/MAML) is evaluated by the
same code from its global `ModelWeights` (`process.get_model_weights(state)`).

Inside the computation the client's test batches are read once and
concatenated, so every measurement is one forward pass (iterating a dataset
inside TFF's runtime costs far more than the small models evaluated here; this
made evaluation ~15x faster). Adaptation steps run with `training=True` (the
model's own loss), measurements with `training=False`.

Accuracy is argmax(predictions, -1) == label, averaged over label entries, so it
also covers per-token accuracy of sequence models; `ignore_label` (e.g.
Shakespeare's pad id 0) leaves a label value out. The loss is the model's loss
on all the client's test examples at once.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import per_fedavg_client_work as client_work_lib
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets

PERCENTILES = (10, 50, 90)


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
  _, y = client_work_lib.split_batch(batch)
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
                            alpha: float, adaptation_steps: Sequence[int],
                            ignore_label: Optional[int] = None,
                            unbatched: bool = False,
                            batch_size: Optional[int] = None,
                            ) -> tff.Computation:
  """The per-client `tff.tensorflow.computation(weights, data) -> metrics`.

  `data` is `OrderedDict(train_data=batches, test_data=batches)`, or with
  `unbatched=True` the same of single examples (batched here by
  `batch_size`). The k-th adaptation step uses the k-th train batch; a client
  whose train batches run out stops adapting (its later steps repeat the last
  weights) and reports how many steps it took in `num_adaptation_steps`.
  `model_fn` is a no-arg callable returning a VariableModel or a
  `tff.learning.models.FunctionalModel`.
  """
  alpha = checks.positive_float('alpha', alpha)
  steps = _check_steps(adaptation_steps)
  max_steps = steps[-1]
  if isinstance(model_fn, tff.learning.models.FunctionalModel):
    return _build_functional_client_evaluation(
        model_fn, model_weights_type, data_type, alpha=alpha, steps=steps,
        ignore_label=ignore_label, unbatched=unbatched,
        batch_size=batch_size)

  @tff.tensorflow.computation(model_weights_type, data_type)
  @tf.autograph.experimental.do_not_convert
  def client_eval(weights, data):
    model = model_fn()
    variables = tuple(model.trainable_variables)

    @tf.function(autograph=False)
    def evaluate(test_batches):
      # One forward pass over all the client's test examples (read once).
      l, c, e, n = _batch_metrics(model, test_batches, ignore_label)
      return collections.OrderedDict(
          loss=tf.math.divide_no_nan(l, n),
          accuracy=tf.math.divide_no_nan(c, e)), n

    @tf.function(autograph=False)
    def sgd_step(batch):
      with tf.GradientTape() as tape:
        out = model.forward_pass(batch, training=True)
      grads = tape.gradient(out.loss, variables)
      for v, g in zip(variables, grads):
        if g is not None:
          v.assign_sub(alpha * tf.cast(g, v.dtype))
      x, _ = client_work_lib.split_batch(batch)
      return tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.int64)

    @tf.function(autograph=False)
    def run(weights, train_data, test_data):
      # Inside tf.function, so automatic control dependencies order the
      # assignment before every read.
      weights.assign_weights_to(model)
      # The model's variables carry the adapted weights: no loop state.
      return _adapt_and_measure(
          tf.constant(0), train_data, test_data,
          evaluate=lambda _, batches: evaluate(batches),
          step=lambda state, batch: (state, sgd_step(batch)),
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
  """
  test_batches = _concatenate(test_data)
  before, num_test = evaluate(state, test_batches)
  iterator = iter(train_data)

  def body(k, state, taken, used, losses, accuracies):
    optional = iterator.get_next_as_optional()

    def adapt():
      new_state, n = step(state, optional.get_value())
      return new_state, taken + 1, used + n

    state, taken, used = tf.cond(optional.has_value(), adapt,
                                 lambda: (state, taken, used))
    after, _ = evaluate(state, test_batches)
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
                                        *, alpha, steps, ignore_label,
                                        unbatched, batch_size):
  """`build_client_evaluation` for a `tff.learning.models.FunctionalModel`:
  the same steps w_k = w_{k-1} - alpha g_{B_k}(w_{k-1}) on explicit weights."""
  max_steps = steps[-1]

  @tff.tensorflow.computation(model_weights_type, data_type)
  @tf.autograph.experimental.do_not_convert
  def client_eval(weights, data):
    non_trainable = tuple(weights.non_trainable)

    def evaluate(trainable, test_batches):
      x, y = client_work_lib.split_batch(test_batches)
      predictions = model.predict_on_batch((trainable, non_trainable), x,
                                           False)
      loss = model.loss(output=predictions, label=y)
      l, c, e, n = _metrics_of(predictions, loss, y, ignore_label)
      return collections.OrderedDict(
          loss=tf.math.divide_no_nan(l, n),
          accuracy=tf.math.divide_no_nan(c, e)), n

    def sgd_step(trainable, batch):
      x, y = client_work_lib.split_batch(batch)
      with tf.GradientTape() as tape:
        tape.watch(trainable)
        loss = model.loss(
            output=model.predict_on_batch((trainable, non_trainable), x,
                                          True), label=y)
      grads = tape.gradient(loss, trainable)
      new = tuple(w if g is None else w - alpha * tf.cast(
          tf.convert_to_tensor(g), w.dtype) for w, g in zip(trainable, grads))
      return new, tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.int64)

    @tf.function(autograph=False)
    def run(trainable, train_data, test_data):
      return _adapt_and_measure(
          trainable, train_data, test_data, evaluate=evaluate, step=sgd_step,
          max_steps=max_steps, steps=steps)

    train_data, test_data = _prepare(data, unbatched=unbatched,
                                     batch_size=batch_size,
                                     max_steps=max_steps)
    return run(tuple(weights.trainable), train_data, test_data)

  return client_eval


INPUT_FORMATS = ('batched', 'unbatched')


def build_personalized_evaluation(model_fn,
                                  *, alpha: float,
                                  adaptation_steps: Sequence[int] | int = (1,),
                                  ignore_label: Optional[int] = None,
                                  input_format: str = 'batched',
                                  batch_size: Optional[int] = None,
                                  ) -> tff.Computation:
  """Builds the personalized evaluation of Per-FedAvg (Fallah et al., 2020).

  From the global model w, per client: w_k = w_{k-1} - alpha g_{B_k}(w_{k-1})
  on the client's train batches B_1, B_2, ..., and the loss and accuracy of
  w_0 = w and of every requested w_k on the client's test data.

  Args:
    model_fn: no-arg callable returning a `tff.learning.models.VariableModel`,
      or a `tff.learning.models.FunctionalModel` (the same `model_fn` the
      algorithms were trained with).
    alpha: step size of the personalization SGD steps (the paper: the same
      alpha as Per-FedAvg's inner step), > 0.
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
    A `tff.Computation` with type signature
    `(ModelWeights@SERVER, {OrderedDict(train_data=B*, test_data=B*)}@CLIENTS)
    -> {OrderedDict(num_test_examples, num_adaptation_steps,
    num_adaptation_examples, metrics=OrderedDict(step_k=OrderedDict(loss,
    accuracy) for k in (0,) + adaptation_steps))}@CLIENTS`. Invoked, it returns
    a list with one such structure per client.
  """
  steps = _check_steps(adaptation_steps)
  alpha = checks.positive_float('alpha', alpha)
  input_format = checks.choice('input_format', input_format, INPUT_FORMATS)
  if batch_size is not None:
    batch_size = checks.integer('batch_size', batch_size, 1)
  if isinstance(model_fn, tff.learning.models.FunctionalModel):
    input_spec = model_fn.input_spec
  else:
    with tf.Graph().as_default():
      input_spec = model_fn().input_spec
  if input_format == 'unbatched':
    input_spec = task_lib.unbatched_spec(input_spec)
  element_type = tff.types.tensorflow_to_type(input_spec)
  data_type = tff.types.StructWithPythonType(
      [('train_data', tff.SequenceType(element_type)),
       ('test_data', tff.SequenceType(element_type))],
      collections.OrderedDict)

  from perfed_tff import per_fedavg  # pylint: disable=g-import-not-at-top
  initial_weights = per_fedavg.initial_model_weights_computation(model_fn)
  model_weights_type = initial_weights.type_signature.result
  client_eval = build_client_evaluation(
      model_fn, model_weights_type, data_type, alpha=alpha,
      adaptation_steps=steps, ignore_label=ignore_label,
      unbatched=input_format == 'unbatched', batch_size=batch_size)

  @tff.federated_computation(
      tff.FederatedType(model_weights_type, tff.SERVER),
      tff.FederatedType(data_type, tff.CLIENTS))
  def personalized_evaluation(weights, client_data):
    return tff.federated_map(
        client_eval, (tff.federated_broadcast(weights), client_data))

  personalized_evaluation.adaptation_steps = steps  # For the Python side.
  personalized_evaluation.alpha = alpha
  personalized_evaluation.input_format = input_format
  personalized_evaluation.batch_size = batch_size
  return personalized_evaluation


# --------------------------------------------------------------------------
# Python side: client inputs, running a population, summaries.


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


def build_worker_side_evaluation(evaluation: tff.Computation, element_spec,
                                 *, adapt_batch_size: Optional[int],
                                 eval_batch_size: int = 256,
                                 shuffle_buffer: int = 1000
                                 ) -> tff.Computation:
  """`evaluation` (batched input) taking each client's examples instead of
  datasets: `(weights@SERVER, {<adapt=examples, test=examples,
  seed=int64>}@CLIENTS)`, with `client_input`'s batches built on the worker
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

  weights_type = evaluation.type_signature.parameter[0]

  @tff.federated_computation(weights_type, tff.FederatedType(
      client_datasets.type_signature.parameter, tff.CLIENTS))
  def worker_side_evaluation(weights, client_inputs):
    return evaluation(weights, tff.federated_map(client_datasets,
                                                 client_inputs))

  return worker_side_evaluation


def client_input(train_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset,
                 *, num_steps: int, adapt_batch_size: Optional[int],
                 seed: int, eval_batch_size: int = 256
                 ) -> collections.OrderedDict:
  """`OrderedDict(train_data=adaptation batches, test_data=test batches)`."""
  return collections.OrderedDict(
      train_data=adaptation_batches(train_dataset, num_steps=num_steps,
                                    batch_size=adapt_batch_size, seed=seed),
      test_data=task_lib.without_pipeline_rewrites(
          test_dataset.batch(eval_batch_size)))


@dataclasses.dataclass
class PopulationResult:
  """Per-client results of one population and their summary."""
  client_ids: list
  num_test_examples: np.ndarray            # [clients]
  accuracy: dict                           # step k -> [clients]
  loss: dict                               # step k -> [clients]
  num_adaptation_steps: np.ndarray         # [clients]

  @property
  def steps(self) -> tuple[int, ...]:
    return tuple(sorted(self.accuracy))

  def summary(self) -> collections.OrderedDict:
    return summarize(self)


def _to_population(client_ids, outputs, steps) -> PopulationResult:
  if isinstance(outputs, Mapping):  # A single client comes back unwrapped.
    outputs = [outputs]
  n_test = np.array([int(o['num_test_examples']) for o in outputs])
  acc = {k: np.array([float(o['metrics'][step_key(k)]['accuracy'])
                      for o in outputs]) for k in steps}
  loss = {k: np.array([float(o['metrics'][step_key(k)]['loss'])
                       for o in outputs]) for k in steps}
  taken = np.array([int(o['num_adaptation_steps']) for o in outputs])
  return PopulationResult(list(client_ids), n_test, acc, loss, taken)


def summarize(result: PopulationResult) -> collections.OrderedDict:
  """Per step k: client-mean accuracy and loss (each client once), the
  example-weighted mean accuracy and loss, percentiles of per-client accuracy.

  Clients without test examples are left out (counted in `num_clients_empty`).
  """
  keep = result.num_test_examples > 0
  weights = result.num_test_examples[keep].astype(np.float64)
  out = collections.OrderedDict(
      num_clients=int(keep.sum()),
      num_clients_empty=int((~keep).sum()),
      num_test_examples=int(weights.sum()))
  for k in result.steps:
    acc = result.accuracy[k][keep]
    loss = result.loss[k][keep]
    s = collections.OrderedDict()
    if acc.size:
      s['accuracy_mean'] = float(np.mean(acc))
      s['accuracy_weighted'] = float(np.average(acc, weights=weights))
      for p in PERCENTILES:
        s[f'accuracy_p{p}'] = float(np.percentile(acc, p))
      s['loss_mean'] = float(np.mean(loss))
      s['loss_weighted'] = float(np.average(loss, weights=weights))
    else:
      for name in (['accuracy_mean', 'accuracy_weighted']
                   + [f'accuracy_p{p}' for p in PERCENTILES]
                   + ['loss_mean', 'loss_weighted']):
        s[name] = float('nan')
    out[step_key(k)] = s
  return out


PROTOCOLS = ('heldout', 'paper')


def check_protocol(protocol: str) -> str:
  return checks.choice('eval_protocols', protocol, PROTOCOLS)


def evaluate_population(evaluation: tff.Computation, model_weights,
                        train_data: tff.simulation.datasets.ClientData,
                        test_data: tff.simulation.datasets.ClientData,
                        client_ids: Optional[Sequence[str]] = None, *,
                        adapt_batch_size: Optional[int] = 32, seed: int = 0,
                        eval_batch_size: int = 256,
                        protocol: str = 'heldout') -> PopulationResult:
  """Runs `evaluation` (from `build_personalized_evaluation`) on clients.

  Adaptation batches come from `train_data` (protocol 'heldout') or from
  `test_data` (protocol 'paper'), seeded by `derive_seed(seed,
  'personalization', client_id)` (the same for every algorithm); metrics
  from `test_data`. Returns per-client results.
  """
  check_protocol(protocol)
  steps = evaluation.adaptation_steps
  if client_ids is None:
    client_ids = list(test_data.client_ids)
  client_ids = list(client_ids)
  adapt_data = test_data if protocol == 'paper' else train_data
  unbatched = getattr(evaluation, 'input_format', 'batched') == 'unbatched'
  if unbatched:
    # The computation batches by its own batch_size: the same batches.
    adapt_batch_size = evaluation.batch_size
  seeds = [task_lib.derive_seed(seed, 'personalization', cid)
           for cid in client_ids]
  if not unbatched:
    # Batches built on the worker from the clients' examples.
    key = (adapt_batch_size, eval_batch_size)
    # Built once per evaluation computation and batch sizes.
    if not hasattr(evaluation, 'worker_side_versions'):
      evaluation.worker_side_versions = {}
    cache = evaluation.worker_side_versions
    if key not in cache:
      cache[key] = build_worker_side_evaluation(
          evaluation, test_data.element_type_structure,
          adapt_batch_size=adapt_batch_size, eval_batch_size=eval_batch_size)
    adapt_examples = worker_datasets.client_examples(adapt_data)
    test_examples = worker_datasets.client_examples(test_data)
    outputs = cache[key](model_weights, [
        collections.OrderedDict(adapt=adapt_examples(cid),
                                test=test_examples(cid), seed=np.int64(s))
        for cid, s in zip(client_ids, seeds)])
    return _to_population(client_ids, outputs, (0,) + tuple(steps))
  inputs = [
      client_input(adapt_data.create_tf_dataset_for_client(cid),
                   test_data.create_tf_dataset_for_client(cid),
                   num_steps=max(steps), adapt_batch_size=adapt_batch_size,
                   seed=s, eval_batch_size=eval_batch_size)
      for cid, s in zip(client_ids, seeds)]
  if unbatched:
    inputs = [collections.OrderedDict(
        train_data=(x['train_data'].take(1).unbatch()
                    if adapt_batch_size is None
                    else x['train_data'].unbatch()),
        test_data=x['test_data'].unbatch()) for x in inputs]
  outputs = evaluation(model_weights, inputs)
  return _to_population(client_ids, outputs, (0,) + tuple(steps))


def evaluate_task(evaluation: tff.Computation, model_weights,
                  task: task_lib.FederatedTask, *,
                  adapt_batch_size: Optional[int] = 32, seed: int = 0,
                  seen_client_ids: Optional[Sequence[str]] = None,
                  unseen_client_ids: Optional[Sequence[str]] = None,
                  eval_batch_size: int = 256,
                  protocols: Sequence[str] = ('heldout',)
                  ) -> collections.OrderedDict:
  """Both populations under each protocol: 'seen' (training clients'
  held-out test data) and 'unseen' (never-trained clients, when the task has
  them); under protocol 'paper' they are named 'seen_paper' and
  'unseen_paper'."""
  out = collections.OrderedDict()
  for protocol in protocols:
    suffix = '' if protocol == 'heldout' else f'_{protocol}'
    populations = [('seen', task.train, task.test, seen_client_ids)]
    if task.unseen is not None:
      populations.append(('unseen', *task.unseen, unseen_client_ids))
    for name, train, test, ids in populations:
      out[name + suffix] = evaluate_population(
          evaluation, model_weights, train, test, ids,
          adapt_batch_size=adapt_batch_size, seed=seed,
          eval_batch_size=eval_batch_size, protocol=protocol)
  return out
