"""Losses, gradients and SGD steps of either kind of TFF model at given weights.

An oracle evaluates a `tff.learning.models.FunctionalModel`
(`FunctionalOracle`) or a `tff.learning.models.VariableModel`
(`VariableOracle`) at explicit trainable weights, a tuple of tensors:

  loss_and_gradient(w, batch, training=True) -> (f(w; B), g_B(w), examples)
  hessian_vector_product(w, batch, v) -> H_B(w) v   (inference mode)
  tracked_loss_and_gradient(w, batch, metrics_state, key)
      -> loss_and_gradient's three and metrics_state with the model's own
         metrics of this batch accumulated under `key`

Gradients come back dense (an embedding's IndexedSlices converted, an unused
weight's None as zeros). `oracle_for(model)` picks the oracle of a model (the
one place that branches on the model's kind), and `sgd_step` / `sgd_steps` take
SGD steps at a step size alpha on any oracle,

    w_k = w_{k-1} - alpha * g_{B_k}(w_{k-1}),   k = 1, 2, ...,

the steps of Per-FedAvg's inner loop, of a user's personalization
(`perfed_tff.export`) and of the benchmark's FedAvg floor (at beta).
`sgd_step(oracle, w, batch, alpha) -> (w', examples)` also fits a loop that
measures between steps.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow as tf
import tensorflow_federated as tff

# A FunctionalModel, or a no-arg callable building a VariableModel (what the
# library's builders take as `model_fn`).
ModelFn = Union[Callable[[], tff.learning.models.VariableModel],
                tff.learning.models.FunctionalModel]


def split_batch(batch):
  """(x, y) of a batch given as a mapping with keys 'x' and 'y' or a pair."""
  if isinstance(batch, Mapping):
    return batch['x'], batch['y']
  return batch[0], batch[1]


def num_rows(structure) -> tf.Tensor:
  """The leading dimension (int64) of the first tensor of `structure`."""
  return tf.shape(tf.nest.flatten(structure)[0], out_type=tf.int64)[0]


def axpy(a, xs, ys):
  """a * xs + ys, elementwise over tuples of tensors."""
  return tuple(a * x + y for x, y in zip(xs, ys))


def _dense(grads, like):
  """Gradients as dense tensors (embeddings give IndexedSlices; an unused
  weight gives None, i.e. zero)."""
  return tuple(tf.zeros_like(w) if g is None else tf.convert_to_tensor(g)
               for g, w in zip(grads, like))


def _dot(xs, ys):
  return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


class FunctionalOracle:
  """The oracle of a `tff.learning.models.FunctionalModel` at fixed
  non-trainable weights.

  Model metrics are functional: `tracked_loss_and_gradient` threads the
  states of `model.update_metrics_state`, one per name of `metrics_keys`
  (no tracking when it is empty or the model has no metrics).
  """

  def __init__(self, model: tff.learning.models.FunctionalModel,
               non_trainable, metrics_keys: Sequence[str] = ()):
    self._model = model
    self._non_trainable = non_trainable
    self._metrics_keys = tuple(metrics_keys)
    self.tracks_metrics = bool(
        self._metrics_keys
        and tf.nest.flatten(model.initialize_metrics_state()))

  def _forward(self, trainable, batch, training):
    x, y = split_batch(batch)
    output = self._model.predict_on_batch(
        (trainable, self._non_trainable), x, training)
    loss = self._model.loss(output=output, label=y)
    return loss, output, num_rows(output), y

  def _gradient(self, trainable, batch, training):
    """(loss, gradient, examples, predictions, labels)."""
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      loss, output, num, y = self._forward(trainable, batch, training)
    grads = _dense(tape.gradient(loss, trainable), trainable)
    return loss, grads, num, output, y

  def loss_and_gradient(self, trainable, batch, training=True):
    loss, grads, num, _, _ = self._gradient(trainable, batch, training)
    return loss, grads, num

  def initial_metrics_state(self):
    return collections.OrderedDict(
        (key, self._model.initialize_metrics_state())
        for key in self._metrics_keys)

  def tracked_loss_and_gradient(self, trainable, batch, metrics_state, key):
    """`loss_and_gradient` (training mode) that also updates
    `metrics_state[key]` with this batch's predictions."""
    loss, grads, num, output, y = self._gradient(trainable, batch, True)
    metrics_state = collections.OrderedDict(metrics_state)
    metrics_state[key] = self._model.update_metrics_state(
        metrics_state[key], labels=y,
        batch_output=tff.learning.models.BatchOutput(
            loss=loss, predictions=output, num_examples=num))
    return loss, grads, num, metrics_state

  def report_metrics(self, metrics_state):
    """The unfinalized metrics of each key."""
    return collections.OrderedDict(metrics_state)

  def hessian_vector_product(self, trainable, batch, vector):
    with tf.GradientTape() as outer:
      outer.watch(trainable)
      with tf.GradientTape() as inner:
        inner.watch(trainable)
        loss, _, _, _ = self._forward(trainable, batch, False)
      grads = _dense(inner.gradient(loss, trainable), trainable)
      grad_dot_v = _dot(grads, vector)
    return _dense(outer.gradient(grad_dot_v, trainable), trainable)


class VariableOracle:
  """The oracle of a `tff.learning.models.VariableModel`: the weights are
  assigned to the model's trainable variables before each evaluation.

  `metrics_models` (optional): `OrderedDict(key=model', ...)`, more instances
  of the same model whose forward passes are only those of
  `tracked_loss_and_gradient(..., key)`, so that their own (Keras) metric
  variables accumulate exactly those batches; every other pass runs on
  `model`, whose metrics are never read.
  """

  def __init__(self, model: tff.learning.models.VariableModel,
               metrics_models: Optional[Mapping[str, Any]] = None):
    self._model = model
    self._vars = tuple(model.trainable_variables)
    self._metrics_models = (collections.OrderedDict(metrics_models)
                            if metrics_models else None)
    self.tracks_metrics = bool(self._metrics_models)

  @staticmethod
  def _assign(variables, trainable):
    for v, t in zip(variables, trainable):
      v.assign(t)

  @staticmethod
  def _loss(model, batch, training):
    out = model.forward_pass(batch, training=training)
    if out.num_examples is not None:
      num = tf.cast(out.num_examples, tf.int64)
    else:
      num = num_rows(out.predictions)
    return out.loss, num

  def _loss_and_gradient(self, model, trainable, batch, training):
    variables = tuple(model.trainable_variables)
    self._assign(variables, trainable)
    with tf.GradientTape() as tape:
      loss, num = self._loss(model, batch, training)
    return loss, _dense(tape.gradient(loss, variables), variables), num

  def loss_and_gradient(self, trainable, batch, training=True):
    return self._loss_and_gradient(self._model, trainable, batch, training)

  def initial_metrics_state(self):
    # The metric state lives in the metrics models' variables; a token keeps
    # the interface of the functional oracle.
    return tf.constant(0, tf.int64)

  def tracked_loss_and_gradient(self, trainable, batch, metrics_state, key):
    loss, grads, num = self._loss_and_gradient(
        self._metrics_models[key], trainable, batch, True)
    return loss, grads, num, metrics_state + 1

  def report_metrics(self, metrics_state):
    """The unfinalized metrics of each key's model."""
    del metrics_state
    return collections.OrderedDict(
        (key, model.report_local_unfinalized_metrics())
        for key, model in self._metrics_models.items())

  def hessian_vector_product(self, trainable, batch, vector):
    self._assign(self._vars, trainable)
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        loss, _ = self._loss(self._model, batch, False)
      grads = _dense(inner.gradient(loss, self._vars), self._vars)
      grad_dot_v = _dot(grads, vector)
    return _dense(outer.gradient(grad_dot_v, self._vars), self._vars)


def oracle_for(model, *, non_trainable=(),
               metrics_keys: Sequence[str] = ()) -> FunctionalOracle | VariableOracle:
  """The oracle of `model`.

  Args:
    model: a `tff.learning.models.FunctionalModel`, a
      `tff.learning.models.VariableModel`, or a no-arg callable building a
      VariableModel (a `ModelFn`; it is called once, plus once per metrics
      key, in that order).
    non_trainable: a FunctionalModel's non-trainable weights (tuple of
      tensors); a VariableModel keeps its own.
    metrics_keys: names under which `tracked_loss_and_gradient` accumulates
      the model's own metrics (for a VariableModel, built by a callable only).
  """
  if isinstance(model, tff.learning.models.FunctionalModel):
    return FunctionalOracle(model, non_trainable, metrics_keys)
  if isinstance(model, tff.learning.models.VariableModel):
    if metrics_keys:
      raise ValueError('tracking metrics of a VariableModel needs a no-arg '
                       'callable building it (one model per metrics key).')
    return VariableOracle(model)
  main = model()
  return VariableOracle(main, collections.OrderedDict(
      (key, model()) for key in metrics_keys))


def input_spec_of(model: ModelFn):
  """The batch spec of a FunctionalModel or of the VariableModel that a no-arg
  callable builds (built in a throwaway graph)."""
  if isinstance(model, tff.learning.models.FunctionalModel):
    return model.input_spec
  with tf.Graph().as_default():
    return model().input_spec


def sgd_step(oracle: FunctionalOracle | VariableOracle, weights, batch,
             alpha):
  """One SGD step at `alpha`: (w - alpha * g_batch(w), examples in the batch),
  the gradient taken in training mode. `weights` is a tuple of tensors."""
  _, grads, num = oracle.loss_and_gradient(weights, batch)
  return axpy(-alpha, grads, weights), num


def sgd_steps(oracle: FunctionalOracle | VariableOracle, weights, batches,
              alpha, max_steps: int):
  """`sgd_step`s from `weights`, the k-th on the k-th batch of `batches` (a
  `tf.data.Dataset` or an iterator over one), at most `max_steps`, fewer when
  the batches run out.

  One `tf.while_loop` pulling batches with `get_next_as_optional`, so it
  traces once inside a `tf.function` (no AutoGraph needed).

  Returns:
    (final weights, steps taken, examples used), the counts int64.
  """
  iterator = iter(batches)
  zero = tf.constant(0, tf.int64)

  def body(w, steps, examples, _):
    optional = iterator.get_next_as_optional()

    def step():
      new_w, num = sgd_step(oracle, w, optional.get_value(), alpha)
      return new_w, steps + 1, examples + num, tf.constant(False)

    return tf.cond(optional.has_value(), step,
                   lambda: (w, steps, examples, tf.constant(True)))

  w, steps, examples, _ = tf.while_loop(
      lambda *state: tf.logical_not(state[-1]), body,
      (tuple(weights), zero, zero, tf.constant(False)),
      maximum_iterations=max_steps)
  return w, steps, examples
