"""`build_per_fedavg`: Per-FedAvg as a `tff.learning.templates.LearningProcess`.

Personalized Federated Averaging: Fallah, Mokhtari & Ozdaglar, "Personalized
Federated Learning with Theoretical Guarantees: A Model-Agnostic
Meta-Learning Approach", NeurIPS 2020, https://arxiv.org/abs/2002.07948.

Composed like `tff.learning.algorithms.build_weighted_fed_avg`: broadcast the
global model w, run Per-FedAvg client work (tau local MAML steps, see
`perfed_tff.per_fedavg_client_work`), aggregate the client updates w - w_i with a weighted
`tff.aggregators` factory (mean by default) and apply them with the server
optimizer (default plain SGD at learning rate 1, so the new global model is
the (weighted) average of the client models, sum_i p_i w_i with
sum_i p_i = 1). Non-finite aggregates are rejected by the finalizer and leave
w unchanged. Hyperparameters (alpha, delta, the client and server optimizer
hyperparameters) live in the process state (`get_hparams`/`set_hparams`).
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


_SUM_FACTORIES = (
    tff.aggregators.SumFactory,
    tff.aggregators.SecureSumFactory,
    tff.aggregators.SecureModularSumFactory,
    tff.aggregators.EncodedSumFactory,
)


def _inner_factories(factory) -> list:
  """Aggregation factories that `factory` wraps: in its attributes
  (`_inner_agg_factory`, `_value_sum_factory`, ...) or, for TFF's
  closure-built wrappers (`tff.aggregators.clipping_factory`,
  `zeroing_factory`, `add_measurements`, ...), in the closure of its
  `create`."""
  found = [v for v in vars(factory).values()
           if isinstance(v, tff.aggregators.AggregationFactory)]
  create = getattr(type(factory), 'create', None)
  for cell in getattr(create, '__closure__', None) or ():
    try:
      value = cell.cell_contents
    except ValueError:  # An empty cell.
      continue
    if isinstance(value, tff.aggregators.AggregationFactory):
      found.append(value)
  return found


def aggregation_semantics(factory) -> str:
  """'mean', 'sum' or 'unknown': what an unweighted factory computes.

  Means: `tff.aggregators.UnweightedMeanFactory` and
  `DifferentiallyPrivateFactory` with a normalized query (every TFF DP
  builder: `gaussian_fixed`, `gaussian_adaptive`, `tree_aggregation`, ...).
  Sums: `SumFactory`, `SecureSumFactory`, `SecureModularSumFactory`,
  `EncodedSumFactory`. Wrappers (clipping, zeroing, measurements, rotations,
  discretization, ...) compute what the factory they wrap computes.
  """
  if isinstance(factory, tff.aggregators.WeightedAggregationFactory):
    return 'mean'
  if isinstance(factory, tff.aggregators.UnweightedMeanFactory):
    return 'mean'
  if isinstance(factory, tff.aggregators.DifferentiallyPrivateFactory):
    import tensorflow_privacy as tfp  # pylint: disable=g-import-not-at-top
    query = getattr(factory, '_query', None)
    return 'mean' if isinstance(query, tfp.NormalizedQuery) else 'sum'
  if isinstance(factory, _SUM_FACTORIES):
    return 'sum'
  kinds = {aggregation_semantics(f) for f in _inner_factories(factory)}
  if 'mean' in kinds:
    return 'mean'
  if kinds == {'sum'}:
    return 'sum'
  return 'unknown'


def check_model_aggregator(
    factory) -> tff.aggregators.WeightedAggregationFactory:
  """The weighted factory `build_per_fedavg` aggregates client updates with.

  As in `tff.learning.algorithms.build_weighted_fed_avg` (weighted factories
  are used as they are) and `build_unweighted_fed_avg` (unweighted ones are
  adapted with `tff.aggregators.as_weighted_aggregator` and ignore the client
  weights). The server applies the aggregate as the average update, so an
  unweighted factory that sums (`tff.aggregators.SumFactory()`, secure or
  encoded sums not wrapped in a mean) is rejected: the server would move by
  the sum of the client updates. Unweighted factories of unknown semantics
  are accepted as means.

  Raises:
    TypeError: `factory` is not a `tff.aggregators` factory, or it sums.
  """
  if factory is None:
    return tff.aggregators.MeanFactory()
  if isinstance(factory, tff.aggregators.WeightedAggregationFactory):
    return factory
  if not isinstance(factory, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(
        '`model_aggregator` must be a tff.aggregators weighted or unweighted '
        f'aggregation factory, got {type(factory)}.')
  if aggregation_semantics(factory) == 'sum':
    raise TypeError(
        f'`model_aggregator` {type(factory).__name__} sums the client updates'
        ', but the server applies the aggregate as the average update, so the '
        'global model would move by the sum of the client updates. Wrap the '
        'sum in a mean (tff.aggregators.MeanFactory(value_sum_factory=...) or '
        'UnweightedMeanFactory(value_sum_factory=...)), or use a mean-like '
        'factory such as tff.learning.robust_aggregator().')
  return tff.aggregators.as_weighted_aggregator(factory)


def _as_weighted_process(factory, value_type) -> tff.templates.AggregationProcess:
  """Aggregation process of `check_model_aggregator(factory)`."""
  process = check_model_aggregator(factory).create(
      value_type, tff.TensorType(np.float32))
  signature = process.next.type_signature
  if signature.parameter[1].member != signature.result[1].member:
    raise TypeError(
        '`model_aggregator` does not keep the type of the client updates: '
        f'{signature.parameter[1].member} != {signature.result[1].member}.')
  return process


OptimizerArg = Union[tff.learning.optimizers.Optimizer,
                     Callable[[], tff.learning.optimizers.Optimizer]]


def check_optimizer(name: str, optimizer_fn) -> tff.learning.optimizers.Optimizer:
  """A `tff.learning.optimizers.Optimizer`, or a no-arg callable returning
  one (what `build_weighted_fed_avg` accepts), as an `Optimizer`."""
  if isinstance(optimizer_fn, tff.learning.optimizers.Optimizer):
    return optimizer_fn
  if callable(optimizer_fn):
    optimizer = optimizer_fn()
    if isinstance(optimizer, tff.learning.optimizers.Optimizer):
      return optimizer
    got = f'a callable returning {type(optimizer).__name__}'
  else:
    got = type(optimizer_fn).__name__
  raise TypeError(
      f'`{name}` must be a tff.learning.optimizers.Optimizer (e.g. '
      'tff.learning.optimizers.build_sgdm(...)) or a no-argument callable '
      f'returning one; Keras optimizers are not accepted. Got {got}.')


def check_client_optimizer(
    beta, client_optimizer_fn) -> tff.learning.optimizers.Optimizer:
  """The client optimizer of every algorithm (`build_per_fedavg` and
  `perfed_tff.algorithms.build_algorithm`, FedAvg included): SGD at `beta`
  when `client_optimizer_fn` is None (then `beta` is required), else
  `client_optimizer_fn` (then `beta` must be None: the optimizer carries
  its own learning rate).

  Raises:
    checks.ArgumentError (beta): beta missing without an optimizer, given
      with one, or not a finite number > 0.
    TypeError (client_optimizer_fn): not a `tff.learning.optimizers`
      optimizer (see `check_optimizer`).
  """
  if client_optimizer_fn is None:
    if beta is None:
      raise checks.ArgumentError(
          'beta', 'is required unless client_optimizer_fn is given')
    beta = checks.positive_float('beta', beta)
    return tff.learning.optimizers.build_sgdm(learning_rate=beta)
  if beta is not None:
    raise checks.ArgumentError(
        'beta', 'is the learning rate of the default client optimizer; '
        'set it in client_optimizer_fn instead of passing both')
  return check_optimizer('client_optimizer_fn', client_optimizer_fn)


def check_server_optimizer(
    server_optimizer_fn) -> tff.learning.optimizers.Optimizer:
  """The server optimizer of every algorithm: SGD at 1.0 (the new global
  model is the average of the client models) when `server_optimizer_fn` is
  None, else `server_optimizer_fn` (see `check_optimizer`)."""
  if server_optimizer_fn is None:
    return tff.learning.optimizers.build_sgdm(learning_rate=1.0)
  return check_optimizer('server_optimizer_fn', server_optimizer_fn)


def build_per_fedavg(
    model_fn: client_work_lib.ModelFn,
    *,
    variant: Union[str, client_work_lib.Variant],
    alpha: float,
    beta: Optional[float] = None,
    delta: float = 1e-3,
    local_steps: int,
    inner_steps: int = 1,
    client_optimizer_fn: Optional[OptimizerArg] = None,
    server_optimizer_fn: Optional[OptimizerArg] = None,
    client_weighting: Union[str, ClientWeighting] = ClientWeighting.UNIFORM,
    model_distributor: Optional[tff.learning.templates.DistributionProcess] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
) -> tff.learning.templates.LearningProcess:
  """Builds Personalized Federated Averaging (Fallah et al., 2020).

  Each sampled client runs tau = `local_steps` MAML steps from the global model
  w: w~ = w - alpha g_D(w), then w <- w - beta * (meta-gradient at w~ on D'),
  with the Hessian term on D'' for HF/MAML (see
  `perfed_tff.per_fedavg_client_work`). With `inner_steps` nu > 1 the
  meta-objective is the loss after nu SGD steps at alpha (Jamali et al.,
  2025, https://arxiv.org/abs/2504.21327):
  grad F(w) = prod_j (I - alpha H_j) g_D'(w_nu).
  `client_optimizer_fn` replaces "w <- w - beta * meta-gradient" by its own
  step on the meta-gradient. The server aggregates the client updates
  Delta_i = w - w_i (weighted mean by default) and applies the aggregate
  with `server_optimizer_fn` (default SGD at 1.0: the new global model is
  the average of the client models, sum_i p_i w_i).

  Hyperparameters live in the process state, as in TFF:
  `process.get_hparams(state)` is
  `OrderedDict(client_work=OrderedDict(alpha, delta,
  client_optimizer=<client optimizer hparams, e.g. learning_rate = beta>),
  finalizer=<server optimizer hparams>)` and
  `process.set_hparams(state, hparams)` changes them for the next rounds
  without rebuilding or retracing anything.

  Client data: a `tf.data.Dataset` of batches; local step t consumes the next
  nu + 1 (FO) or 2 nu + 1 (HF, MAML) batches in order (2 or 3 for nu = 1).

  Args:
    model_fn: a no-arg callable returning a `tff.learning.models.VariableModel`,
      or a `tff.learning.models.FunctionalModel` (as accepted by
      `tff.learning.algorithms.build_weighted_fed_avg`).
    variant: 'fo', 'hf' or 'maml'.
    alpha: inner (personalization) step size, > 0 (initial value; in state).
    beta: outer (meta) step size of the default client optimizer (SGD at
      beta), > 0; required unless `client_optimizer_fn` is given, and not
      allowed with it.
    delta: finite-difference radius of HF, > 0 (unused by FO and MAML).
    local_steps: tau, local steps per round, an int >= 1.
    inner_steps: nu, SGD steps at alpha inside the meta-objective, an int
      >= 1 (1: the paper's Per-FedAvg).
    client_optimizer_fn: a `tff.learning.optimizers.Optimizer` (or a no-arg
      callable returning one) applying the meta-gradient on the client; its
      state starts afresh every round. Default SGD at `beta`.
    server_optimizer_fn: the same, applying the aggregated update on the
      server (state kept across rounds). Default SGD at 1.0.
    client_weighting: 'uniform' (the paper: every client model counts
      equally) or 'num_examples' (weight = examples the client consumed), or
      the matching `tff.learning.ClientWeighting`.
    model_distributor: a `tff.learning.templates.DistributionProcess`;
      default `tff.learning.templates.build_broadcast_process`.
    model_aggregator: a `tff.aggregators` factory for the client updates:
      weighted factories as they are (default `MeanFactory()`), unweighted
      mean-like ones (DP, robust, compression) through
      `tff.aggregators.as_weighted_aggregator`; sums raise `TypeError`.
    metrics_aggregator: like `tff.learning.metrics.sum_then_finalize` (the
      default) or `secure_sum_then_finalize`: called with (a callable
      finalizing all metrics, the unfinalized metrics type).

  Returns:
    A `tff.learning.templates.LearningProcess` with `initialize`, `next`,
    `get_model_weights`, `set_model_weights`, `get_hparams` and
    `set_hparams`. Training metrics (`metrics['client_work']['train']`):
    `loss`, `personalized_loss` (NaN in a round where no client update was
    usable: every client non-finite or without a step, or no clients),
    `num_examples`, `num_steps`, `num_clients_without_step`,
    `num_non_finite_updates` and the model's own metrics at w on D (e.g.
    `sparse_categorical_accuracy`) and at w~ on D'
    (`personalized_sparse_categorical_accuracy`).
    Run it in a `perfed_tff.ExecutionContext()`: a computation that fails
    on the worker (e.g. a label outside the model's range) then raises
    `perfed_tff.runtime.worker_errors.WorkerComputationError` (a `ValueError`)
    with TensorFlow's one telling line.

  Raises:
    ValueError: on an unknown variant or client weighting, alpha/beta/delta
      <= 0, local_steps or inner_steps < 1, beta missing (or given with a
      client optimizer: `check_client_optimizer`, the rule
      `perfed_tff.algorithms.build_algorithm` applies to every algorithm).
    TypeError: a bad model_fn, optimizer, distributor or aggregator (an
      unweighted sum factory included).
  """
  variant = check_variant(variant)
  alpha = checks.positive_float('alpha', alpha)
  delta = checks.positive_float('delta', delta)
  local_steps = checks.integer('local_steps', local_steps, 1)
  inner_steps = checks.integer('inner_steps', inner_steps, 1)
  client_weighting = check_weighting(client_weighting)
  client_optimizer = check_client_optimizer(beta, client_optimizer_fn)
  server_optimizer = check_server_optimizer(server_optimizer_fn)
  if metrics_aggregator is not None and not callable(metrics_aggregator):
    raise TypeError('`metrics_aggregator` must be callable, got '
                    f'{type(metrics_aggregator)}.')
  if model_distributor is not None and not isinstance(
      model_distributor, tff.learning.templates.DistributionProcess):
    raise TypeError('`model_distributor` must be a tff.learning.templates.'
                    f'DistributionProcess, got {type(model_distributor)}.')

  initial_weights_fn = initial_model_weights_computation(model_fn)
  model_weights_type = initial_weights_fn.type_signature.result
  distributor = (model_distributor or
                 tff.learning.templates.build_broadcast_process(
                     model_weights_type))
  aggregator = _as_weighted_process(model_aggregator,
                                    model_weights_type.trainable)
  client_work = client_work_lib.build_per_fedavg_client_work(
      model_fn, model_weights_type, variant=variant, alpha=alpha,
      delta=delta, local_steps=local_steps, inner_steps=inner_steps,
      client_optimizer=client_optimizer,
      uniform_weighting=client_weighting is ClientWeighting.UNIFORM,
      metrics_aggregator=metrics_aggregator)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, model_weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights_fn, distributor, client_work, aggregator, finalizer)
