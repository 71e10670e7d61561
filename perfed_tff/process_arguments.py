"""The arguments every learning-process builder of this library takes, each
checked by one rule (`build_per_fedavg`, `build_fed_avg`, `build_algorithm`).

As in `tff.learning.algorithms.build_weighted_fed_avg`: optimizers are
`tff.learning.optimizers.Optimizer`s (or no-argument callables returning
one; Keras optimizers are refused), the client weighting is a
`tff.learning.ClientWeighting` (or its name), the model aggregator any
`tff.aggregators` factory. The step sizes (alpha, beta, delta) follow
`perfed_tff.checks.step_size`, the one rule the training program's settings
use as well. Only TFF's public API is used.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks

ClientWeighting = tff.learning.ClientWeighting
OptimizerArg = Union[tff.learning.optimizers.Optimizer,
                     Callable[[], tff.learning.optimizers.Optimizer]]


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


# The unweighted factories that sum their inputs. Wrapped in a mean
# (`MeanFactory(value_sum_factory=...)`, `UnweightedMeanFactory(...)`) they
# are means; alone, the server would move by the sum of the client updates.
SUM_FACTORIES = (
    tff.aggregators.SumFactory,
    tff.aggregators.SecureSumFactory,
    tff.aggregators.SecureModularSumFactory,
    tff.aggregators.EncodedSumFactory,
)


def check_model_aggregator(
    factory) -> tff.aggregators.WeightedAggregationFactory:
  """The weighted factory the client updates are aggregated with.

  As in `tff.learning.algorithms.build_weighted_fed_avg` (weighted factories
  are used as they are) and `build_unweighted_fed_avg` (unweighted ones are
  adapted with `tff.aggregators.as_weighted_aggregator` and ignore the client
  weights). The server applies the aggregate as the average update, so one
  of TFF's sum factories (`SUM_FACTORIES`: `SumFactory`, `SecureSumFactory`,
  `SecureModularSumFactory`, `EncodedSumFactory`) passed as the aggregator
  itself is refused: the server would move by the sum of the client
  updates. Every other unweighted factory is taken as a mean (TFF's
  `DifferentiallyPrivateFactory` builders, robust and compression
  wrappers); a wrapper around a sum cannot be told from one around a mean
  with TFF's public API, so it is the caller's to build a mean.

  Raises:
    TypeError: `factory` is not a `tff.aggregators` factory, or it is a sum.
  """
  if factory is None:
    return tff.aggregators.MeanFactory()
  if isinstance(factory, tff.aggregators.WeightedAggregationFactory):
    return factory
  if not isinstance(factory, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(
        '`model_aggregator` must be a tff.aggregators weighted or unweighted '
        f'aggregation factory, got {type(factory)}.')
  if isinstance(factory, SUM_FACTORIES):
    raise TypeError(
        f'`model_aggregator` {type(factory).__name__} sums the client updates'
        ', but the server applies the aggregate as the average update, so the '
        'global model would move by the sum of the client updates. Wrap the '
        'sum in a mean (tff.aggregators.MeanFactory(value_sum_factory=...) or '
        'UnweightedMeanFactory(value_sum_factory=...)), or use a mean-like '
        'factory such as tff.learning.robust_aggregator().')
  return tff.aggregators.as_weighted_aggregator(factory)


def weighted_aggregation_process(factory, value_type
                                 ) -> tff.templates.AggregationProcess:
  """The aggregation process of `check_model_aggregator(factory)` for client
  updates of `value_type`, weighted by float32 client weights.

  Raises:
    TypeError: the process does not keep the type of the updates.
  """
  process = check_model_aggregator(factory).create(
      value_type, tff.TensorType(np.float32))
  signature = process.next.type_signature
  if signature.parameter[1].member != signature.result[1].member:
    raise TypeError(
        '`model_aggregator` does not keep the type of the client updates: '
        f'{signature.parameter[1].member} != {signature.result[1].member}.')
  return process


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
  """The client optimizer of every algorithm: SGD at `beta` when
  `client_optimizer_fn` is None (then `beta` is required), else
  `client_optimizer_fn` (then `beta` must be None: the optimizer carries
  its own learning rate).

  Raises:
    checks.ArgumentError (beta): beta missing without an optimizer, given
      with one, or not a step size (`checks.step_size`).
    TypeError (client_optimizer_fn): not a `tff.learning.optimizers`
      optimizer (see `check_optimizer`).
  """
  if client_optimizer_fn is None:
    if beta is None:
      raise checks.ArgumentError(
          'beta', 'is required unless client_optimizer_fn is given')
    beta = checks.step_size('beta', beta)
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


def check_distributor(model_distributor) -> None:
  """None or a `tff.learning.templates.DistributionProcess`."""
  if model_distributor is not None and not isinstance(
      model_distributor, tff.learning.templates.DistributionProcess):
    raise TypeError('`model_distributor` must be a tff.learning.templates.'
                    f'DistributionProcess, got {type(model_distributor)}.')


def check_metrics_aggregator(metrics_aggregator) -> None:
  """None or a callable like `tff.learning.metrics.sum_then_finalize`."""
  if metrics_aggregator is not None and not callable(metrics_aggregator):
    raise TypeError('`metrics_aggregator` must be callable, got '
                    f'{type(metrics_aggregator)}.')
