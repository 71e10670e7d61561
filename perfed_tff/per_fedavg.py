"""`build_per_fedavg`: Per-FedAvg as a `tff.learning.templates.LearningProcess`.

Personalized Federated Averaging: Fallah, Mokhtari & Ozdaglar, "Personalized
Federated Learning with Theoretical Guarantees: A Model-Agnostic
Meta-Learning Approach", NeurIPS 2020, https://arxiv.org/abs/2002.07948.

Composed like `tff.learning.algorithms.build_weighted_fed_avg`: broadcast the
global model w, run Per-FedAvg client work (tau local MAML steps, see
`perfed_tff.per_fedavg_client_work`), aggregate the client updates w - w_i with a weighted
`tff.aggregators` factory (mean by default) and apply them with plain SGD at
learning rate 1, so the new global model is the (weighted) average of the
client models, sum_i p_i w_i with sum_i p_i = 1. Non-finite aggregates are
rejected by the finalizer and leave w unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import per_fedavg_client_work as client_work_lib

ClientWeighting = tff.learning.ClientWeighting


def check_variant(variant) -> client_work_lib.Variant:
  """'fo' | 'hf' | 'maml' (any case) or a `Variant` -> `Variant`."""
  try:
    return client_work_lib.Variant(
        variant.lower() if isinstance(variant, str) else variant)
  except ValueError:
    raise checks.ArgumentError(
        'variant', f'must be one of {[v.value for v in client_work_lib.Variant]}'
        f', got {variant!r}') from None


def check_weighting(client_weighting) -> ClientWeighting:
  """'uniform' | 'num_examples' or a `tff.learning.ClientWeighting`."""
  if isinstance(client_weighting, ClientWeighting):
    return client_weighting
  names = {'uniform': ClientWeighting.UNIFORM,
           'num_examples': ClientWeighting.NUM_EXAMPLES}
  if isinstance(client_weighting, str) and client_weighting.lower() in names:
    return names[client_weighting.lower()]
  raise checks.ArgumentError(
      'client_weighting', 'must be a tff.learning.ClientWeighting or one of '
      f'{sorted(names)}, got {client_weighting!r}')


def initial_model_weights_computation(model_fn) -> tff.Computation:
  """A no-arg `tff.Computation` returning the model's initial `ModelWeights`
  (the same as `build_weighted_fed_avg` uses, so weights are interchangeable)."""
  if isinstance(model_fn, tff.learning.models.FunctionalModel):

    @tff.tensorflow.computation
    def initial_weights():
      trainable, non_trainable = model_fn.initial_weights
      return tff.learning.models.ModelWeights(
          tuple(tf.convert_to_tensor(w) for w in trainable),
          tuple(tf.convert_to_tensor(w) for w in non_trainable))
    return initial_weights
  if not callable(model_fn):
    raise TypeError(
        '`model_fn` must be a no-argument callable returning a '
        'tff.learning.models.VariableModel, or a '
        f'tff.learning.models.FunctionalModel; got {type(model_fn)}.')

  @tff.tensorflow.computation
  def initial_weights():
    model = model_fn()
    if not isinstance(model, tff.learning.models.VariableModel):
      raise TypeError(
          '`model_fn` must return a tff.learning.models.VariableModel, got '
          f'{type(model)}.')
    return tff.learning.models.ModelWeights.from_model(model)
  return initial_weights


def _as_weighted_process(factory, value_type) -> tff.templates.AggregationProcess:
  """Aggregation process of `factory`; an unweighted factory (for example
  `tff.aggregators.DifferentiallyPrivateFactory`) ignores the weights."""
  if isinstance(factory, tff.aggregators.WeightedAggregationFactory):
    return factory.create(value_type, tff.TensorType(np.float32))
  if not isinstance(factory, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(
        '`model_aggregator` must be a tff.aggregators weighted or unweighted '
        f'aggregation factory, got {type(factory)}.')
  process = factory.create(value_type)

  @tff.federated_computation(
      process.initialize.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(np.float32, tff.CLIENTS))
  def next_fn(state, value, weight):
    del weight
    return process.next(state, value)

  return tff.templates.AggregationProcess(process.initialize, next_fn)


def build_per_fedavg(
    model_fn: client_work_lib.ModelFn,
    *,
    variant: Union[str, client_work_lib.Variant],
    alpha: float,
    beta: float,
    delta: float = 1e-3,
    local_steps: int,
    client_weighting: Union[str, ClientWeighting] = ClientWeighting.UNIFORM,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
) -> tff.learning.templates.LearningProcess:
  """Builds Personalized Federated Averaging (Fallah et al., 2020).

  Each sampled client runs tau = `local_steps` MAML steps from the global model
  w: w~ = w - alpha g_D(w), then w <- w - beta * (meta-gradient at w~ on D'),
  with the Hessian term on D'' for HF/MAML (see `perfed_tff.per_fedavg_client_work`).
  The server sets w to the average of the returned client models.

  Client data: a `tf.data.Dataset` of batches; local step t consumes the next
  2 (FO) or 3 (HF, MAML) batches in order.

  Args:
    model_fn: a no-arg callable returning a `tff.learning.models.VariableModel`,
      or a `tff.learning.models.FunctionalModel` (as accepted by
      `tff.learning.algorithms.build_weighted_fed_avg`).
    variant: 'fo', 'hf' or 'maml'.
    alpha: inner (personalization) step size, > 0.
    beta: outer (meta) step size, > 0.
    delta: finite-difference radius of HF, > 0 (unused by FO and MAML).
    local_steps: tau, local steps per round, an int >= 1.
    client_weighting: 'uniform' (the paper: every client model counts
      equally) or 'num_examples' (weight = examples the client consumed), or
      the matching `tff.learning.ClientWeighting`.
    model_aggregator: a `tff.aggregators` factory for the client updates
      (weighted, or unweighted such as DP/compression); default
      `tff.aggregators.MeanFactory()`.
    metrics_aggregator: like `tff.learning.metrics.sum_then_finalize` (the
      default): called with (metric finalizers, unfinalized metrics type).

  Returns:
    A `tff.learning.templates.LearningProcess` with `initialize`, `next`,
    `get_model_weights` and `set_model_weights`.

  Raises:
    ValueError: on an unknown variant or client weighting, alpha/beta/delta
      <= 0, or local_steps < 1.
  """
  variant = check_variant(variant)
  alpha = checks.positive_float('alpha', alpha)
  beta = checks.positive_float('beta', beta)
  delta = checks.positive_float('delta', delta)
  local_steps = checks.integer('local_steps', local_steps, 1)
  client_weighting = check_weighting(client_weighting)
  if metrics_aggregator is not None and not callable(metrics_aggregator):
    raise TypeError('`metrics_aggregator` must be callable, got '
                    f'{type(metrics_aggregator)}.')

  initial_weights_fn = initial_model_weights_computation(model_fn)
  model_weights_type = initial_weights_fn.type_signature.result
  distributor = tff.learning.templates.build_broadcast_process(model_weights_type)
  aggregator = _as_weighted_process(
      model_aggregator or tff.aggregators.MeanFactory(),
      model_weights_type.trainable)
  client_work = client_work_lib.build_per_fedavg_client_work(
      model_fn, model_weights_type, variant=variant, alpha=alpha, beta=beta,
      delta=delta, local_steps=local_steps,
      uniform_weighting=client_weighting is ClientWeighting.UNIFORM,
      metrics_aggregator=metrics_aggregator)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      tff.learning.optimizers.build_sgdm(learning_rate=1.0),
      model_weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights_fn, distributor, client_work, aggregator, finalizer)
