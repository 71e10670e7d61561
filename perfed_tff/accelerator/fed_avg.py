"""FedAvg as TFF builds it, with less fixed cost per client: the program's
FedAvg under the accelerator (`perfed_tff.program.launch`).

`build_fed_avg(task, **kwargs)` builds the same process as the core's
`perfed_tff.fed_avg.build_fed_avg(task.model_fn, **kwargs)` (TFF's
`build_weighted_fed_avg` on the task's VariableModel: the same state type,
initial model, hyperparameters, weights and metrics), faster:

* on the task's `FunctionalModel` (`build_functional_fed_avg`) where TFF's
  `functional_model_from_keras` carries the Keras model whole (no
  regularization losses, no BatchNormalization) and the model has no
  convolutions (1.08x on the EMNIST CNN with oneDNN's kernels): the
  templates of `build_weighted_fed_avg` with `build_fed_avg_client_work`,
  the state, hyperparameters and broadcast of TFF's VariableModel client
  work around TFF's own functional client update (private in TFF 0.87:
  `model_delta_client_work.build_functional_model_delta_update`), whose
  optimizer starts from those hyperparameters; 0.91-0.96x the time on the
  digits MLP, 0.96x on the char LSTM;
* else on the VariableModel (`build_variable_model_fed_avg`), TFF's
  `build_weighted_fed_avg` whose clients build their models without
  computing random initial values, which the broadcast model overwrites.

Tests compare both with TFF's `build_weighted_fed_avg`, bit for bit (a
model with random layers such as dropout draws other numbers in any case).
docs/performance.md, section 7, direction 4.
"""

from __future__ import annotations

import collections

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning.models import functional as tff_functional
from tensorflow_federated.python.learning.templates import model_delta_client_work

from perfed_tff import fed_avg as core_fed_avg
from perfed_tff import per_fedavg_client_work as client_work_lib
from perfed_tff import process_arguments as args_lib
from perfed_tff.accelerator import compilation
from perfed_tff.data import task as task_lib


class _StartingFrom(tff.learning.optimizers.Optimizer):
  """`optimizer` whose `initialize` returns a state with `hparams` set: how
  TFF's VariableModel client update starts its optimizer
  (`initialize`, then `set_hparams`)."""

  def __init__(self, optimizer: tff.learning.optimizers.Optimizer, hparams):
    self._optimizer = optimizer
    self._hparams = hparams

  def initialize(self, specs):
    return self._optimizer.set_hparams(self._optimizer.initialize(specs),
                                       self._hparams)

  def next(self, state, weights, gradients):
    return self._optimizer.next(state, weights, gradients)

  def get_hparams(self, state):
    return self._optimizer.get_hparams(state)

  def set_hparams(self, state, hparams):
    return self._optimizer.set_hparams(state, hparams)


def build_fed_avg_client_work(
    model: tff.learning.models.FunctionalModel,
    weights_type: tff.types.Type,
    *,
    optimizer: tff.learning.optimizers.Optimizer,
    client_weighting: tff.learning.ClientWeighting,
    metrics_aggregator=None,
) -> tff.learning.templates.ClientWorkProcess:
  """FedAvg's client work on `model`, its state the client optimizer's
  hyperparameters (as `build_model_delta_client_work`'s): each round the
  state is broadcast and every client runs TFF's functional update from it,
  with TFF's DATASET_ITERATOR loop (the project's FedAvg loop,
  `perfed_tff.algorithms`; TFF's functional update fails under
  DATASET_REDUCE in TFF 0.87). `weights_type` is the `ModelWeights` type the
  distributor sends."""
  if metrics_aggregator is None:
    metrics_aggregator = tff.learning.metrics.sum_then_finalize
  # The hyperparameters of a state for a whimsy spec, as TFF's client work.
  initial_hparams = optimizer.get_hparams(
      optimizer.initialize(tf.TensorSpec(shape=(), dtype=tf.float32)))

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(initial_hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))

  get_hparams_fn, set_hparams_fn = client_work_lib.hparams_computations(
      state_type)

  @tff.tensorflow.computation(state_type, weights_type, data_type)
  def client_update(hparams, initial_weights, dataset):
    update = model_delta_client_work.build_functional_model_delta_update(
        model=model, weighting=client_weighting,
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
    return update(_StartingFrom(optimizer, hparams),
                  (initial_weights.trainable, initial_weights.non_trainable),
                  dataset)

  @tff.federated_computation(init_fn.type_signature.result,
                             tff.FederatedType(weights_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def next_fn(state, weights, client_data):
    results, unfinalized_metrics = tff.federated_map(
        client_update, (tff.federated_broadcast(state), weights, client_data))
    train_metrics = metrics_aggregator(model.finalize_metrics)(
        unfinalized_metrics)
    return tff.templates.MeasuredProcessOutput(
        state, results, tff.federated_zip(
            collections.OrderedDict(train=train_metrics)))

  return tff.learning.templates.ClientWorkProcess(
      init_fn, next_fn, get_hparams_fn=get_hparams_fn,
      set_hparams_fn=set_hparams_fn)


def build_functional_fed_avg(
    model: tff.learning.models.FunctionalModel,
    *,
    initial_weights_fn: tff.Computation,
    client_optimizer: tff.learning.optimizers.Optimizer,
    server_optimizer: tff.learning.optimizers.Optimizer,
    client_weighting: tff.learning.ClientWeighting,
    model_distributor=None,
    model_aggregator=None,
    metrics_aggregator=None,
) -> tff.learning.templates.LearningProcess:
  """Weighted FedAvg on `model`, composed as `build_weighted_fed_avg` with
  `build_fed_avg_client_work`. Arguments are those of
  `build_weighted_fed_avg`, already checked (`perfed_tff.algorithms.
  build_algorithm` checks them): optimizers as `Optimizer`s,
  `model_aggregator` a `WeightedAggregationFactory` (default the weighted
  mean), `initial_weights_fn` the model's initial `ModelWeights`."""
  weights_type = initial_weights_fn.type_signature.result
  distributor = (model_distributor or
                 tff.learning.templates.build_broadcast_process(weights_type))
  aggregator = (model_aggregator or tff.aggregators.MeanFactory()).create(
      weights_type.trainable, tff.TensorType(np.float32))
  client_work = build_fed_avg_client_work(
      model, weights_type, optimizer=client_optimizer,
      client_weighting=client_weighting,
      metrics_aggregator=metrics_aggregator)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights_fn, distributor, client_work, aggregator, finalizer)


def _zeros_for_trainable(next_creator, **kwargs):
  """Variable creator: a trainable variable of known shape and dtype whose
  initial value would be computed (an initializer) starts at zeros."""
  shape, dtype = kwargs.get('shape'), kwargs.get('dtype')
  if (kwargs.get('trainable') is True and callable(kwargs.get('initial_value'))
      and shape is not None and tf.TensorShape(shape).is_fully_defined()
      and dtype is not None):
    kwargs['initial_value'] = lambda: tf.zeros(shape, dtype)
  return next_creator(**kwargs)


def _unwrapped(variable):
  """The variable under a Keras mixed-precision `AutoCastVariable`."""
  return getattr(variable, '_variable', variable)


def trainables_are_weights(model_fn) -> bool:
  """Whether every variable `model_fn()` creates as trainable is one of the
  model's weights, trainable or not (a frozen layer's): the weights TFF's
  client update overwrites with the broadcast model before using them.
  Built in a graph of its own."""
  created = []

  def record(next_creator, **kwargs):
    variable = next_creator(**kwargs)
    if kwargs.get('trainable') is not False:
      created.append(variable)
    return variable

  with tf.Graph().as_default(), tf.variable_creator_scope(record):
    model = model_fn()
    weights = {id(_unwrapped(v)) for v in (list(model.trainable_variables) +
                                            list(model.non_trainable_variables))}
  return bool(created) and all(id(_unwrapped(v)) in weights for v in created)


def build_variable_model_fed_avg(model_fn, **kwargs
                                 ) -> tff.learning.templates.LearningProcess:
  """TFF's `build_weighted_fed_avg(model_fn, **kwargs)` on a `VariableModel`,
  whose clients build their models without computing random initial values.

  TFF's client update builds the model in the round's graph, so every
  client of every round initializes the model's variables with their
  initializers (Glorot's: Philox random numbers, scaled, for each of the
  EMNIST CNN's 1.2 million weights), then overwrites the trainable and
  non-trainable weights with the broadcast model before using them. Here
  `next` is TFF's, built from `model_fn` under a variable creator that gives
  each variable created as trainable zeros as its initial value;
  `initialize`, the weights and the hyperparameters are those of TFF's
  process on `model_fn` itself, so the state type, the initial model, and
  the weights and metrics of every round are TFF's (tests/test_fed_avg.py,
  bit for bit; a model with random layers such as dropout draws other
  numbers in any case). A model that creates a trainable variable that is
  not one of its weights (`trainables_are_weights`) gets TFF's process
  unchanged. The model must not read a weight's initial value (a
  regularizer toward the initial weights, a variable initialized from a
  weight's value): such a model needs TFF's `build_weighted_fed_avg`.
  `model_fn` is traced twice as often as by TFF's builder alone, and the
  aggregator and distributor arguments serve both builds.
  """
  process = tff.learning.algorithms.build_weighted_fed_avg(model_fn, **kwargs)
  if not trainables_are_weights(model_fn):
    logging.info('FedAvg: TFF\'s client update as it is (the model creates a '
                 'trainable variable that is not one of its weights)')
    return process

  def client_model_fn():
    with tf.variable_creator_scope(_zeros_for_trainable):
      return model_fn()

  clients = tff.learning.algorithms.build_weighted_fed_avg(
      client_model_fn, **kwargs)
  return tff.learning.templates.LearningProcess(
      process.initialize, clients.next, process.get_model_weights,
      process.set_model_weights, get_hparams_fn=process.get_hparams,
      set_hparams_fn=process.set_hparams)


def functional_model_or_none(task):
  """The task's `FunctionalModel` with FedAvg's `loss` metric where FedAvg
  on it is TFF's FedAvg on `task.model_fn`, bit for bit, and faster; None
  where the VariableModel is the one to train: a Keras model that TFF's
  `functional_model_from_keras` does not carry whole (regularization losses,
  BatchNormalization; `task_lib.functional_model_carries`), a
  convolutional model (`compilation.model_has_convolutions`), or a task
  whose FunctionalModel cannot be made (no Keras model:
  `perfed_tff.data.baseline_tasks`; TFF's `KerasFunctionalModelError`).
  `task`: a `FederatedTask`, or anything with its `model_fn` and
  `functional_model` (None: none) and optionally its `keras_model_fn`."""
  if getattr(task, 'functional_model', None) is None:
    return None
  keras_model_fn = getattr(task, 'keras_model_fn', None)
  try:
    if (keras_model_fn is not None
        and not task_lib.functional_model_carries(keras_model_fn)):
      return None
    model = task.functional_model(loss_metric=True)
  except (TypeError, tff_functional.KerasFunctionalModelError) as e:
    logging.info('FedAvg on the VariableModel: %s', e)
    return None
  return None if compilation.model_has_convolutions(model) else model


def build_fed_avg(task, **kwargs) -> tff.learning.templates.LearningProcess:
  """`perfed_tff.fed_avg.build_fed_avg(task.model_fn, **kwargs)`'s process,
  on the task's FunctionalModel where that is faster
  (`functional_model_or_none`), else on its VariableModel without random
  initial values per client."""
  arguments = core_fed_avg.weighted_fed_avg_arguments(**kwargs)
  model = functional_model_or_none(task)
  if model is None:
    return build_variable_model_fed_avg(task.model_fn, **arguments)
  return build_functional_fed_avg(
      model,
      initial_weights_fn=args_lib.initial_model_weights_computation(model),
      client_optimizer=arguments['client_optimizer_fn'],
      server_optimizer=arguments['server_optimizer_fn'],
      client_weighting=arguments['client_weighting'],
      model_distributor=arguments['model_distributor'],
      model_aggregator=arguments['model_aggregator'],
      metrics_aggregator=arguments['metrics_aggregator'])
