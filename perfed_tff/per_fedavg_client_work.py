"""Per-FedAvg client work: tau local MAML steps with `tf.GradientTape`.

One local step at weights w on the client's next batches D, D' (, D''):

  inner (personalization) step:  w~ = w - alpha * g_D(w)
  outer gradient at w~ on D':     g  = g_D'(w~)
  FO:    w <- w - beta * g
  HF:    w <- w - beta * (g - alpha * h),
         h = [g_D''(w + delta*g) - g_D''(w - delta*g)] / (2*delta)
  MAML:  w <- w - beta * (g - alpha * H_D''(w) g)   (Hessian-vector product
         by nested tapes; the Hessian is never formed)

g_B(v) is the gradient of the mean loss on batch B at weights v. The client
runs `local_steps` (tau) steps, consuming its batches strictly in order (D, D'
for FO; D, D', D'' for HF and MAML), or fewer when its data run out before a
full step. It returns `ClientResult(update = w_0 - w_tau, update_weight)`;
a client that completed no step, or whose weights became non-finite, returns a
zero update with weight 0.

The curvature term (h, or H g) is evaluated in inference mode
(`training=False`), so that the two finite-difference gradients of HF see the
same function even for models with dropout; for models without stochastic
layers this is the plain training loss.
"""

from __future__ import annotations

import collections
import enum
import functools
from typing import Any, Callable, Mapping, Optional, Union

import tensorflow as tf
import tensorflow_federated as tff

ModelFn = Union[Callable[[], tff.learning.models.VariableModel],
                tff.learning.models.FunctionalModel]


class Variant(enum.Enum):
  """Which meta-gradient a local step uses."""
  FO = 'fo'      # first order: drops the Hessian term
  HF = 'hf'      # Hessian-free: finite-difference Hessian-vector product
  MAML = 'maml'  # exact Hessian-vector product


def batches_per_step(variant: Variant) -> int:
  """Number of batches one local step consumes (2 for FO, 3 otherwise)."""
  return 2 if Variant(variant) is Variant.FO else 3


def gradient_evaluations_per_step(variant: Variant) -> int:
  """Batch gradient evaluations per local step: FO 2, HF 4, MAML 3 (the HVP
  costs about one extra gradient)."""
  return {Variant.FO: 2, Variant.HF: 4, Variant.MAML: 3}[Variant(variant)]


def split_batch(batch):
  if isinstance(batch, Mapping):
    return batch['x'], batch['y']
  return batch[0], batch[1]


def _dense(grads, like):
  """Gradients as dense tensors (embeddings give IndexedSlices; an unused
  weight gives None, i.e. zero)."""
  return tuple(tf.zeros_like(w) if g is None else tf.convert_to_tensor(g)
               for g, w in zip(grads, like))


def _dot(xs, ys):
  return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


def _axpy(a, xs, ys):
  """a * xs + ys, elementwise over tuples of tensors."""
  return tuple(a * x + y for x, y in zip(xs, ys))


class _FunctionalOracle:
  """Losses, gradients and HVPs of a `tff.learning.models.FunctionalModel`."""

  def __init__(self, model: tff.learning.models.FunctionalModel,
               non_trainable):
    self._model = model
    self._non_trainable = non_trainable

  def _loss(self, trainable, batch, training):
    x, y = split_batch(batch)
    output = self._model.predict_on_batch(
        (trainable, self._non_trainable), x, training)
    loss = self._model.loss(output=output, label=y)
    num = tf.shape(tf.nest.flatten(output)[0], out_type=tf.int64)[0]
    return loss, num

  def loss_and_gradient(self, trainable, batch, training=True):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      loss, num = self._loss(trainable, batch, training)
    return loss, _dense(tape.gradient(loss, trainable), trainable), num

  def hessian_vector_product(self, trainable, batch, vector):
    with tf.GradientTape() as outer:
      outer.watch(trainable)
      with tf.GradientTape() as inner:
        inner.watch(trainable)
        loss, _ = self._loss(trainable, batch, False)
      grads = _dense(inner.gradient(loss, trainable), trainable)
      grad_dot_v = _dot(grads, vector)
    return _dense(outer.gradient(grad_dot_v, trainable), trainable)


class _VariableOracle:
  """The same for a `tff.learning.models.VariableModel`: weights are assigned
  to the model's variables before each evaluation."""

  def __init__(self, model: tff.learning.models.VariableModel):
    self._model = model
    self._vars = tuple(model.trainable_variables)

  def _assign(self, trainable):
    for v, t in zip(self._vars, trainable):
      v.assign(t)

  def _loss(self, batch, training):
    out = self._model.forward_pass(batch, training=training)
    if out.num_examples is not None:
      num = tf.cast(out.num_examples, tf.int64)
    else:
      num = tf.shape(tf.nest.flatten(out.predictions)[0], out_type=tf.int64)[0]
    return out.loss, num

  def loss_and_gradient(self, trainable, batch, training=True):
    self._assign(trainable)
    with tf.GradientTape() as tape:
      loss, num = self._loss(batch, training)
    return loss, _dense(tape.gradient(loss, self._vars), self._vars), num

  def hessian_vector_product(self, trainable, batch, vector):
    self._assign(trainable)
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        loss, _ = self._loss(batch, False)
      grads = _dense(inner.gradient(loss, self._vars), self._vars)
      grad_dot_v = _dot(grads, vector)
    return _dense(outer.gradient(grad_dot_v, self._vars), self._vars)


def per_fedavg_local_step(oracle, w, batches, *, variant: Variant, alpha: float,
                          beta: float, delta: float):
  """One Per-FedAvg local step at trainable weights `w` (tuple of tensors).

  Returns (new_w, loss at w on D, loss at w~ on D', examples used).
  """
  loss_d, grad_d, n_d = oracle.loss_and_gradient(w, batches[0])
  w_tilde = _axpy(-alpha, grad_d, w)
  loss_dp, g, n_dp = oracle.loss_and_gradient(w_tilde, batches[1])
  examples = n_d + n_dp
  if variant is Variant.FO:
    direction = g
  else:
    batch_dpp = batches[2]
    if variant is Variant.HF:
      _, g_plus, n_dpp = oracle.loss_and_gradient(
          _axpy(delta, g, w), batch_dpp, training=False)
      _, g_minus, _ = oracle.loss_and_gradient(
          _axpy(-delta, g, w), batch_dpp, training=False)
      h = tuple((p - m) / (2.0 * delta) for p, m in zip(g_plus, g_minus))
    else:
      h = oracle.hessian_vector_product(w, batch_dpp, g)
      x, _ = split_batch(batch_dpp)
      n_dpp = tf.shape(tf.nest.flatten(x)[0], out_type=tf.int64)[0]
    direction = _axpy(-alpha, h, g)
    examples += n_dpp
  new_w = _axpy(-beta, direction, w)
  return new_w, loss_d, loss_dp, examples


def build_client_update(oracle, *, variant: Variant, alpha: float, beta: float,
                        delta: float, local_steps: int):
  """A `tf.function(initial_trainable, dataset)` running tau local steps.

  Returns (final trainable weights, metrics dict). The whole loop lives in one
  graph: batches are pulled with `get_next_as_optional`, so a client whose
  data run out stops after its last complete step.
  """
  k = batches_per_step(variant)

  @tf.function
  def client_update(initial_trainable, dataset):
    w = tuple(initial_trainable)
    iterator = iter(dataset)
    steps = tf.constant(0, tf.int64)
    examples = tf.constant(0, tf.int64)
    loss_sum = tf.constant(0.0, tf.float32)
    personalized_loss_sum = tf.constant(0.0, tf.float32)
    for _ in tf.range(local_steps):
      optionals = [iterator.get_next_as_optional() for _ in range(k)]
      complete = functools.reduce(
          tf.logical_and, [o.has_value() for o in optionals])
      if not complete:
        break
      batches = [o.get_value() for o in optionals]
      w, loss_d, loss_dp, n = per_fedavg_local_step(
          oracle, w, batches, variant=variant, alpha=alpha, beta=beta,
          delta=delta)
      steps += 1
      examples += n
      loss_sum += tf.cast(loss_d, tf.float32)
      personalized_loss_sum += tf.cast(loss_dp, tf.float32)
    metrics = collections.OrderedDict(
        loss=(loss_sum, tf.cast(steps, tf.float32)),
        personalized_loss=(personalized_loss_sum, tf.cast(steps, tf.float32)),
        num_examples=examples,
        num_steps=steps,
    )
    return w, metrics

  return client_update


def _mean_finalizer(pair):
  return tf.math.divide_no_nan(pair[0], pair[1])


def metric_finalizers() -> collections.OrderedDict:
  """Finalizers of the client metrics, for `tff.learning.metrics` aggregators.

  loss: mean over local steps of f(w; D); personalized_loss: mean of
  f(w~; D'); num_examples / num_steps: totals; num_clients_without_step and
  num_non_finite_updates count clients that sent a zero-weight update.
  """
  identity = lambda x: x
  return collections.OrderedDict(
      loss=_mean_finalizer,
      personalized_loss=_mean_finalizer,
      num_examples=identity,
      num_steps=identity,
      num_clients_without_step=identity,
      num_non_finite_updates=identity,
  )


def _input_spec(model_fn: ModelFn):
  if isinstance(model_fn, tff.learning.models.FunctionalModel):
    return model_fn.input_spec
  with tf.Graph().as_default():
    return model_fn().input_spec


def build_per_fedavg_client_work(
    model_fn: ModelFn,
    model_weights_type: tff.types.Type,
    *,
    variant: Variant,
    alpha: float,
    beta: float,
    delta: float,
    local_steps: int,
    uniform_weighting: bool,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
) -> tff.learning.templates.ClientWorkProcess:
  """Builds the `ClientWorkProcess` running Per-FedAvg local steps.

  Arguments are validated by `perfed_tff.build_per_fedavg`; see there.
  next_fn: <state@SERVER, ModelWeights@CLIENTS, {batches*}@CLIENTS> ->
  <state, ClientResult(update = w_0 - w_tau, update_weight)@CLIENTS,
  OrderedDict(train=metrics)@SERVER>.
  """
  variant = Variant(variant)
  functional = isinstance(model_fn, tff.learning.models.FunctionalModel)
  element_type = tff.types.tensorflow_to_type(_input_spec(model_fn))
  data_type = tff.SequenceType(element_type)
  if metrics_aggregator is None:
    metrics_aggregator = tff.learning.metrics.sum_then_finalize

  @tff.tensorflow.computation(model_weights_type, data_type)
  def client_update(initial_weights, dataset):
    if functional:
      oracle = _FunctionalOracle(
          model_fn, tuple(initial_weights.non_trainable))
    else:
      oracle = _VariableOracle(model_fn())
    update_fn = build_client_update(
        oracle, variant=variant, alpha=alpha, beta=beta, delta=delta,
        local_steps=local_steps)
    initial = tuple(tf.nest.flatten(initial_weights.trainable))
    final, metrics = update_fn(initial, dataset)
    update = tuple(a - b for a, b in zip(initial, final))
    update, non_finite = _zero_if_non_finite(update)
    no_step = tf.equal(metrics['num_steps'], 0)
    rejected = tf.logical_or(no_step, tf.cast(non_finite, tf.bool))
    if uniform_weighting:
      weight = tf.constant(1.0)
    else:
      weight = tf.cast(metrics['num_examples'], tf.float32)
    weight = tf.where(rejected, 0.0, weight)
    # Metrics of a non-finite client would poison the round's means.
    keep = tf.logical_not(tf.cast(non_finite, tf.bool))
    metrics = tf.nest.map_structure(
        lambda m: tf.where(keep, m, tf.zeros_like(m)), metrics)
    metrics['num_clients_without_step'] = tf.cast(no_step, tf.int64)
    metrics['num_non_finite_updates'] = tf.cast(non_finite, tf.int64)
    update = tf.nest.pack_sequence_as(initial_weights.trainable, list(update))
    return (tff.learning.templates.ClientResult(update=update,
                                                update_weight=weight),
            metrics)

  unfinalized_type = client_update.type_signature.result[1]
  metrics_aggregation = metrics_aggregator(metric_finalizers(),
                                           unfinalized_type)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(model_weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    client_result, client_metrics = tff.federated_map(
        client_update, (weights, client_data))
    train_metrics = metrics_aggregation(client_metrics)
    measurements = tff.federated_zip(
        collections.OrderedDict(train=train_metrics))
    return tff.templates.MeasuredProcessOutput(
        state, client_result, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def _zero_if_non_finite(structure):
  flat = tf.nest.flatten(structure)
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
  return tf.cond(
      finite,
      lambda: (structure, tf.constant(0)),
      lambda: (tf.nest.map_structure(tf.zeros_like, structure), tf.constant(1)))
