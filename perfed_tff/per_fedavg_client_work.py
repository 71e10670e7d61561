"""Per-FedAvg's client work: tau local MAML steps per client, as a TFF process.

Each client runs `local_steps` (tau) steps of `perfed_tff.per_fedavg_step`
(the math, with the paper's symbols) from the global model w, consuming its
batches in order, or fewer when its data run out before a full step. It
returns `ClientResult(update = w_0 - w_tau, update_weight)`; a client that
completed no step, or whose weights became non-finite, returns a zero update
with weight 0.

Training metrics: `loss` = f(w; D) and `personalized_loss` = f(w~; D')
(w~ = w_nu), means over the local steps (NaN when no client took a usable
step: all non-finite, none with a step, or no clients), example and step
counts, and the
model's own metrics (e.g. accuracy) accumulated over the batches D at w and,
prefixed `personalized_`, over the batches D' at w~.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import model_oracles
from perfed_tff import per_fedavg_step as step_lib
from perfed_tff.per_fedavg_step import MODEL_METRICS
from perfed_tff.per_fedavg_step import PERSONALIZED_MODEL_METRICS
from perfed_tff.per_fedavg_step import PERSONALIZED_PREFIX
from perfed_tff.per_fedavg_step import Variant

ModelFn = model_oracles.ModelFn

def build_client_update(oracle, *, variant: Variant, alpha: float,
                        beta: Optional[float] = None, delta: float,
                        local_steps: int, inner_steps: int = 1,
                        optimizer: Optional[
                            tff.learning.optimizers.Optimizer] = None):
  """A `tf.function(initial_trainable, dataset, hparams=None)` running tau
  local steps.

  Args:
    oracle: a `model_oracles` oracle.
    variant: FO, HF or MAML.
    alpha, delta: inner step size and HF radius used when `hparams` is None.
    beta: outer step size, when `optimizer` is None (plain SGD).
    local_steps: tau.
    inner_steps: nu.
    optimizer: a `tff.learning.optimizers.Optimizer` applying the
      meta-gradient (initialized at the start of every client update);
      `None`: SGD at `beta`.

  The returned function's optional `hparams` is
  `OrderedDict(alpha=, delta=, client_optimizer=optimizer hparams)` (tensors,
  e.g. from the process state); None uses the build-time values.

  Returns (final trainable weights, metrics dict). The whole loop lives in one
  graph: batches are pulled with `get_next_as_optional`, so a client whose
  data run out stops after its last complete step.
  """
  k = step_lib.batches_per_step(variant, inner_steps)
  if optimizer is None:
    if beta is None:
      raise ValueError('`beta` is needed when no `optimizer` is given.')
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=beta)
  track = bool(getattr(oracle, 'tracks_metrics', False))

  # No AutoGraph: the loop below is written with tf.while_loop / tf.cond,
  # so tracing does not transpile this function and everything it calls
  # (that was two thirds of building the process; docs/performance.md).
  @tf.function(autograph=False)
  def client_update(initial_trainable, dataset, hparams=None):
    if hparams is None:
      inner_alpha, radius, optimizer_hparams = alpha, delta, None
    else:
      inner_alpha, radius = hparams['alpha'], hparams['delta']
      optimizer_hparams = hparams['client_optimizer']
    w = tuple(initial_trainable)
    optimizer_state = optimizer.initialize(
        tuple(tf.TensorSpec(t.shape, t.dtype) for t in w))
    if optimizer_hparams is not None:
      optimizer_state = optimizer.set_hparams(optimizer_state,
                                              optimizer_hparams)
    optimizer_state = tf.nest.map_structure(tf.convert_to_tensor,
                                            optimizer_state)
    # A token when untracked: loop variables cannot be None.
    metrics_state = (oracle.initial_metrics_state() if track
                     else tf.constant(0, tf.int64))
    iterator = iter(dataset)
    zero = tf.constant(0.0, tf.float32)
    # Loop state: (w, optimizer state, metrics state, steps, examples,
    # sum of f(w; D), sum of f(w~; D'), data ran out).
    initial = (w, optimizer_state, metrics_state, tf.constant(0, tf.int64),
               tf.constant(0, tf.int64), zero, zero, tf.constant(False))

    def local_step(loop_state, batches):
      (w, optimizer_state, metrics_state, steps, examples, loss_sum,
       personalized_loss_sum, _) = loop_state
      w, loss_d, loss_dp, n, optimizer_state, new_metrics_state = (
          step_lib.per_fedavg_local_step(
              oracle, w, batches, variant=variant, alpha=inner_alpha,
              delta=radius, inner_steps=inner_steps, optimizer=optimizer,
              optimizer_state=optimizer_state,
              metrics_state=metrics_state if track else None))
      if track:
        metrics_state = new_metrics_state
      return (w, optimizer_state, metrics_state, steps + 1, examples + n,
              loss_sum + tf.cast(loss_d, tf.float32),
              personalized_loss_sum + tf.cast(loss_dp, tf.float32),
              tf.constant(False))

    def body(loop_state):
      # A step needs k complete batches; a client whose data run out stops
      # after its last complete step.
      optionals = [iterator.get_next_as_optional() for _ in range(k)]
      complete = functools.reduce(
          tf.logical_and, [o.has_value() for o in optionals])
      return (tf.cond(
          complete,
          lambda: local_step(loop_state,
                             [o.get_value() for o in optionals]),
          lambda: loop_state[:-1] + (tf.constant(True),)),)

    def cond(loop_state):
      return tf.logical_not(loop_state[-1])

    (final,) = tf.while_loop(cond, body, (initial,),
                             maximum_iterations=local_steps)
    (w, _, metrics_state, steps, examples, loss_sum, personalized_loss_sum,
     _) = final
    # [sum, count] lists (not tuples): secure summation needs lists.
    metrics = collections.OrderedDict(
        loss=[loss_sum, tf.cast(steps, tf.float32)],
        personalized_loss=[personalized_loss_sum, tf.cast(steps, tf.float32)],
        num_examples=examples,
        num_steps=steps,
    )
    if track:
      metrics.update(oracle.report_metrics(metrics_state))
    return w, metrics

  return client_update


def _mean_finalizer(pair):
  """sum / count; NaN when no client took a usable step (every client
  non-finite or without a step, or no clients), not the 0.0 of an empty
  weighted mean. (divide_no_nan: the very same division otherwise.)"""
  total, count = pair
  return tf.where(count > 0, tf.math.divide_no_nan(total, count),
                  tf.constant(float('nan'), total.dtype))


def metric_finalizers() -> collections.OrderedDict:
  """Finalizers of the Per-FedAvg client metrics (without the model's own).

  loss: mean over local steps of f(w; D); personalized_loss: mean of
  f(w~; D') (both NaN in a round where no client took a usable step);
  num_examples / num_steps: totals; num_clients_without_step and
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


def build_metrics_finalizer(model_finalizer=None) -> Callable[..., Any]:
  """One callable finalizing all client metrics (for `tff.learning.metrics`
  aggregators, which accept a callable as `metric_finalizers`).

  `model_finalizer`: the model's `metric_finalizers()` (VariableModel, an
  OrderedDict of callables) or `finalize_metrics` (FunctionalModel). Its
  results come out under the model's metric names (at w on D) and prefixed
  `personalized_` (at w~ on D'); names that Per-FedAvg already reports
  (`loss`, `num_examples`, `personalized_loss`) keep Per-FedAvg's meaning.
  """
  own = metric_finalizers()

  def finalize_model(unfinalized):
    if callable(model_finalizer):
      return model_finalizer(unfinalized)
    return collections.OrderedDict(
        (name, fn(unfinalized[name])) for name, fn in model_finalizer.items())

  def finalize(unfinalized):
    out = collections.OrderedDict(
        (name, fn(unfinalized[name])) for name, fn in own.items())
    for key, prefix in ((MODEL_METRICS, ''),
                        (PERSONALIZED_MODEL_METRICS, PERSONALIZED_PREFIX)):
      if model_finalizer is None or key not in unfinalized:
        continue
      for name, value in finalize_model(unfinalized[key]).items():
        if prefix + name not in out:
          out[prefix + name] = value
    return out

  return finalize


def initial_hparams(*, alpha: float, delta: float,
                    optimizer: tff.learning.optimizers.Optimizer
                    ) -> collections.OrderedDict:
  """The client work's state = its hyperparameters:
  `OrderedDict(alpha, delta, client_optimizer=optimizer hparams)`."""
  whimsy = optimizer.initialize(tf.TensorSpec([], tf.float32))
  return collections.OrderedDict(
      alpha=float(alpha), delta=float(delta),
      client_optimizer=optimizer.get_hparams(whimsy))


def hparams_computations(state_type) -> tuple[tff.Computation, tff.Computation]:
  """(get_hparams, set_hparams) of a client work whose state is its
  hyperparameters, as TFF's model-delta client work: the state itself, and
  the new hyperparameters as the new state."""

  @tff.tensorflow.computation(state_type)
  def get_hparams(state):
    return state

  @tff.tensorflow.computation(state_type, state_type)
  def set_hparams(state, hparams):
    del state
    return hparams

  return get_hparams, set_hparams


def build_per_fedavg_client_work(
    model_fn: ModelFn,
    model_weights_type: tff.types.Type,
    *,
    variant: Variant,
    alpha: float,
    beta: Optional[float] = None,
    delta: float,
    local_steps: int,
    uniform_weighting: bool,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
    inner_steps: int = 1,
    client_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
) -> tff.learning.templates.ClientWorkProcess:
  """Builds the `ClientWorkProcess` running Per-FedAvg local steps.

  Arguments are validated by `perfed_tff.build_per_fedavg`; see there.
  `client_optimizer` (default: SGD at `beta`) applies the meta-gradient.
  State (= hyperparameters, `get_hparams`/`set_hparams`):
  `OrderedDict(alpha, delta, client_optimizer=its hparams)`, read by every
  client at every round (changing it needs no rebuild and no retrace).
  next_fn: <state@SERVER, ModelWeights@CLIENTS, {batches*}@CLIENTS> ->
  <state, ClientResult(update = w_0 - w_tau, update_weight)@CLIENTS,
  OrderedDict(train=metrics)@SERVER>.
  """
  variant = Variant(variant)
  functional = isinstance(model_fn, tff.learning.models.FunctionalModel)
  element_type = tff.types.tensorflow_to_type(
      model_oracles.input_spec_of(model_fn))
  data_type = tff.SequenceType(element_type)
  if metrics_aggregator is None:
    metrics_aggregator = tff.learning.metrics.sum_then_finalize
  if client_optimizer is None:
    client_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=beta)
  hparams = initial_hparams(alpha=alpha, delta=delta,
                            optimizer=client_optimizer)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member

  # Plain Python control flow only: AutoGraph would only transpile it.
  @tff.tensorflow.computation(state_type, model_weights_type, data_type)
  @tf.autograph.experimental.do_not_convert
  def client_update(state, initial_weights, dataset):
    oracle = model_oracles.oracle_for(
        model_fn, non_trainable=tuple(initial_weights.non_trainable),
        metrics_keys=(MODEL_METRICS, PERSONALIZED_MODEL_METRICS))
    update_fn = build_client_update(
        oracle, variant=variant, alpha=alpha, delta=delta,
        local_steps=local_steps, inner_steps=inner_steps,
        optimizer=client_optimizer)
    initial = tuple(tf.nest.flatten(initial_weights.trainable))
    final, metrics = update_fn(initial, dataset, state)
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
  if functional:
    model_finalizer = model_fn.finalize_metrics
  else:
    with tf.Graph().as_default():
      model_finalizer = model_fn().metric_finalizers()
  metrics_aggregation = metrics_aggregator(
      build_metrics_finalizer(model_finalizer), unfinalized_type)

  get_hparams_fn, set_hparams_fn = hparams_computations(state_type)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(model_weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    state_at_clients = tff.federated_broadcast(state)
    client_result, client_metrics = tff.federated_map(
        client_update, (state_at_clients, weights, client_data))
    train_metrics = metrics_aggregation(client_metrics)
    measurements = tff.federated_zip(
        collections.OrderedDict(train=train_metrics))
    return tff.templates.MeasuredProcessOutput(
        state, client_result, measurements)

  return tff.learning.templates.ClientWorkProcess(
      init_fn, next_fn, get_hparams_fn=get_hparams_fn,
      set_hparams_fn=set_hparams_fn)


def _zero_if_non_finite(structure):
  flat = tf.nest.flatten(structure)
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
  return tf.cond(
      finite,
      lambda: (structure, tf.constant(0)),
      lambda: (tf.nest.map_structure(tf.zeros_like, structure), tf.constant(1)))
