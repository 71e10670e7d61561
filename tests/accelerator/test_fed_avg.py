"""The accelerator's FedAvg (`perfed_tff.accelerator.fed_avg`) is the
core's (`perfed_tff.fed_avg.build_fed_avg`: TFF's `build_weighted_fed_avg`
on the VariableModel): on a FunctionalModel of the same Keras model the same
state type and hyperparameters, bit for bit the same weights and metrics,
and a state of either process runs in the other (checkpoints move between
the runtimes). So is FedAvg on a VariableModel whose clients skip the random
initial values (`build_variable_model_fed_avg`)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import fed_avg as core_fed_avg
from perfed_tff import process_arguments
from perfed_tff.accelerator import fed_avg
from perfed_tff.data import task as task_lib
from perfed_tff.models import mlp
from perfed_tff.program import checkpointing
from perfed_tff.program import processes
from tests import tff_helpers as h

SHAPE, CLASSES, HIDDEN = (h.DIM,), h.CLASSES, (8,)


def keras_model():
  return mlp.create_mlp(SHAPE, CLASSES, hidden_units=HIDDEN, seed=4)


def variable_model_fn():
  return tff.learning.models.from_keras_model(
      keras_model(), loss=mlp.loss_fn(), input_spec=mlp.element_spec(SHAPE),
      metrics=task_lib.accuracy_metrics())


def build_pair(client_weighting, optimizer, **extra):
  """(the core's FedAvg on the VariableModel, the accelerator's on the
  FunctionalModel)."""
  kwargs = dict(client_weighting=client_weighting, **extra)
  if optimizer == 'sgd':
    kwargs['beta'] = 0.3
  else:
    kwargs['client_optimizer_fn'] = tff.learning.optimizers.build_adam(0.05)
  functional = task_lib.functional_model(
      keras_model, mlp.loss_fn, mlp.element_spec(SHAPE),
      task_lib.accuracy_metrics, loss_metric=True)
  core = core_fed_avg.build_fed_avg(variable_model_fn, **kwargs)
  weighting = process_arguments.check_weighting(kwargs.pop('client_weighting'))
  beta = kwargs.pop('beta', None)
  aggregator = kwargs.pop('model_aggregator', None)
  fast = fed_avg.build_functional_fed_avg(
      functional,
      initial_weights_fn=process_arguments.initial_model_weights_computation(
          functional),
      client_optimizer=process_arguments.check_client_optimizer(
          beta, kwargs.pop('client_optimizer_fn', None)),
      server_optimizer=process_arguments.check_server_optimizer(None),
      client_weighting=weighting,
      model_aggregator=(None if aggregator is None else
                        process_arguments.check_model_aggregator(aggregator)))
  return core, fast


def clients(seed, *, non_finite=False):
  data = [h.dataset(*h.random_client(seed + i, n), 4)
          for i, n in enumerate((10, 7, 13))]
  if non_finite:   # a client whose update is NaN: weight 0, metrics reset
    x, y = h.random_client(seed, 8)
    x[0, 0] = np.nan
    data.append(h.dataset(x, y, 4))
  return data


def flat_metrics(metrics, prefix=''):
  """[(path, value)] of nested metric mappings, in their order."""
  out = []
  for name, value in metrics.items():
    if hasattr(value, 'items'):
      out += flat_metrics(value, f'{prefix}{name}/')
    else:
      out.append((prefix + name, np.asarray(value)))
  return out


def assert_same_round(pair, states, data):
  """One round of both processes from `states`: every metric (names in the
  same order) and the weights bit for bit the same."""
  outputs = [p.next(s, data) for p, s in zip(pair, states)]
  metrics = [flat_metrics(o.metrics) for o in outputs]
  assert [n for n, _ in metrics[0]] == [n for n, _ in metrics[1]]
  assert 'client_work/train/loss' in dict(metrics[0])
  for (name, a), (_, b) in zip(*metrics):
    np.testing.assert_array_equal(a, b, name)
  for a, b in zip(*(h.trainable(p, o.state) for p, o in zip(pair, outputs))):
    np.testing.assert_array_equal(a, b)
  return [o.state for o in outputs]


@pytest.mark.parametrize('client_weighting,optimizer,non_finite,extra', [
    ('uniform', 'sgd', False, {}), ('num_examples', 'adam', False, {}),
    ('num_examples', 'sgd', True, {}),
    # An aggregator with a state of its own (adaptive clipping, zeroing).
    ('num_examples', 'sgd', False,
     {'model_aggregator': tff.learning.robust_aggregator()})])
def test_functional_fed_avg_is_tffs_fed_avg_bit_for_bit(
    client_weighting, optimizer, non_finite, extra):
  pair = build_pair(client_weighting, optimizer, **extra)
  states = [p.initialize() for p in pair]
  assert (checkpointing.leaf_specs(states[0])
          == checkpointing.leaf_specs(states[1]))
  for name in ('initialize', 'next'):   # names included (list vs tuple aside)
    assert (str(getattr(pair[0], name).type_signature)
            == str(getattr(pair[1], name).type_signature))
  assert pair[0].get_hparams(states[0]) == pair[1].get_hparams(states[1])
  for r in range(2):
    states = assert_same_round(pair, states, clients(10 * r,
                                                     non_finite=non_finite))
  # The client learning rate is in the state of both, and used.
  hparams = [p.get_hparams(s) for p, s in zip(pair, states)]
  for hp in hparams:
    hp['client_work']['learning_rate'] = np.float32(0.01)
  states = [p.set_hparams(s, hp) for p, s, hp in zip(pair, states, hparams)]
  assert_same_round(pair, states, clients(30))


def test_a_state_of_either_process_runs_in_the_other():
  """A checkpoint of a FedAvg run before it moved to the FunctionalModel
  continues in the new process as in the old, and the other way round (the
  program trains convolutional models on the VariableModel)."""
  pair = build_pair('uniform', 'sgd')
  for process in pair:
    state = process.next(process.initialize(), clients(0)).state
    assert_same_round(pair, (state, state), clients(5))


def test_functional_fed_avg_creates_no_model_variables():
  """What it is for: a round makes no variables for each client (TFF's
  VariableModel client update creates and initializes the model's)."""
  variable, functional = build_pair('uniform', 'sgd')
  assert _creates_variables(variable)
  assert not _creates_variables(functional)


def _creates_variables(process) -> bool:
  return b'VarHandleOp' in process.next._computation_proto.SerializeToString()


def test_the_training_program_trains_fed_avg_on_the_functional_model(
    tmp_path, small_task):
  """... under the accelerator, with the task's `loss` metric; a
  convolutional model and a task without a Keras model (a TFF baseline task
  whose model is not from_keras_model's) keep TFF's FedAvg on the task's
  `model_fn`; without the accelerator it is the core's, on `model_fn`."""
  config = h.training_config(tmp_path, algorithm='fedavg',
                             runtime='accelerated')
  assert _creates_variables(processes.build_process(
      h.training_config(tmp_path, algorithm='fedavg', runtime='tff'),
      small_task))
  process = processes.build_process(config, small_task)
  assert not _creates_variables(process)
  metrics = process.next.type_signature.result[1].member['client_work']
  assert 'loss' in tff.structure.name_list(metrics['train'])

  def no_keras_model():
    raise TypeError('no Keras model')
  no_keras = dataclasses.replace(small_task, keras_model_fn=no_keras_model)
  assert _creates_variables(processes.build_process(config, no_keras))

  def convolutional():
    inputs = tf.keras.Input(small_task.element_spec['x'].shape[1:])
    x = tf.keras.layers.Reshape((-1, 1))(inputs)
    x = tf.keras.layers.Flatten()(tf.keras.layers.Conv1D(2, 3)(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3)(x))
  # (Only the choice is checked: the task's model_fn stays its own.)
  conv = dataclasses.replace(small_task, keras_model_fn=convolutional)
  assert _creates_variables(processes.build_process(config, conv))


@pytest.mark.parametrize('layer', [
    lambda: tf.keras.layers.Dense(3, kernel_regularizer='l2'),
    lambda: tf.keras.layers.BatchNormalization()])
def test_fed_avg_stays_on_the_variable_model_where_the_functional_one_differs(
    layer):
  """TFF's functional_model_from_keras leaves out regularization losses and
  cannot update BatchNormalization statistics: such a model keeps TFF's
  FedAvg on its model_fn."""
  def keras_model_fn():
    inputs = tf.keras.Input(SHAPE)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES)(
        layer()(inputs)))
  assert not task_lib.functional_model_carries(keras_model_fn)
  assert task_lib.functional_model_carries(keras_model)

  def functional_model_fn(**kwargs):
    return task_lib.functional_model(
        keras_model_fn, mlp.loss_fn, mlp.element_spec(SHAPE),
        task_lib.accuracy_metrics, **kwargs)
  task = _Task(variable_model_fn, functional_model_fn, keras_model_fn)
  assert fed_avg.functional_model_or_none(task) is None


@dataclasses.dataclass
class _Task:
  model_fn: object
  functional_model: object
  keras_model_fn: object


def conv_model_fn():
  """A convolutional VariableModel with no random layer."""
  def keras():
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Reshape((-1, 1))(inputs)
    x = tf.keras.layers.Conv1D(3, 3, kernel_initializer=(
        tf.keras.initializers.GlorotUniform(seed=2)))(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(
        CLASSES, kernel_initializer=tf.keras.initializers.RandomNormal(
            seed=3), bias_initializer='ones')(x))
  return tff.learning.models.from_keras_model(
      keras(), loss=mlp.loss_fn(), input_spec=mlp.element_spec(SHAPE),
      metrics=task_lib.accuracy_metrics())


def bn_regularized_model_fn():
  """BatchNormalization and an L2 regularizer: what the training program
  keeps on the VariableModel (`fed_avg.functional_model_or_none`)."""
  def keras():
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Dense(4, kernel_regularizer='l2', kernel_initializer=(
        tf.keras.initializers.HeNormal(seed=5)))(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(
        CLASSES, kernel_initializer=tf.keras.initializers.TruncatedNormal(
            seed=6))(x))
  return tff.learning.models.from_keras_model(
      keras(), loss=mlp.loss_fn(), input_spec=mlp.element_spec(SHAPE),
      metrics=task_lib.accuracy_metrics())


# Ops of TensorFlow's random initializers (uniform, normal, truncated
# normal, stateless forms).
_RANDOM_OPS = (b'RandomUniform', b'RandomStandardNormal', b'TruncatedNormal',
               b'StatelessRandom', b'StatelessTruncatedNormal')


def _draws_random_numbers(computation) -> bool:
  proto = computation._computation_proto.SerializeToString()
  return any(op in proto for op in _RANDOM_OPS)


@pytest.mark.parametrize('model_fn', [variable_model_fn, conv_model_fn,
                                      bn_regularized_model_fn])
def test_variable_model_fed_avg_is_tffs_fed_avg_bit_for_bit(model_fn):
  """Its clients draw no initial values (what it is for), and nothing else
  changes: the initial model, types, hyperparameters, every metric and the
  weights over rounds, either state in the other process."""
  kwargs = dict(client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.3),
                server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
                client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
                loop_implementation=(
                    tff.learning.LoopImplementation.DATASET_ITERATOR))
  pair = (tff.learning.algorithms.build_weighted_fed_avg(model_fn, **kwargs),
          fed_avg.build_variable_model_fed_avg(model_fn, **kwargs))
  assert _draws_random_numbers(pair[0].next)
  assert not _draws_random_numbers(pair[1].next)
  assert _draws_random_numbers(pair[1].initialize)
  for name in ('initialize', 'next', 'get_model_weights'):
    assert (str(getattr(pair[0], name).type_signature)
            == str(getattr(pair[1], name).type_signature))
  states = [p.initialize() for p in pair]
  for a, b in zip(*(h.trainable(p, s) for p, s in zip(pair, states))):
    np.testing.assert_array_equal(a, b)
  assert pair[0].get_hparams(states[0]) == pair[1].get_hparams(states[1])
  for r in range(2):
    states = assert_same_round(pair, states, clients(10 * r))
  states = [pair[1].next(states[0], clients(40)).state] * 2
  assert_same_round(pair, states, clients(50))


def test_the_accelerators_fed_avg_on_a_convolutional_model_is_so():
  task = _Task(conv_model_fn, None, None)
  process = fed_avg.build_fed_avg(task, beta=0.3)
  assert not _draws_random_numbers(process.next)
  assert _draws_random_numbers(
      core_fed_avg.build_fed_avg(conv_model_fn, beta=0.3).next)


def test_a_model_with_a_trainable_variable_outside_its_weights_keeps_tffs():
  """A trainable variable that the client update does not overwrite keeps
  its initial value: such a model gets TFF's process unchanged. A frozen
  layer's variables are weights (non-trainable ones), overwritten too."""
  def with_extra_variable():
    tf.Variable(tf.ones([2]), trainable=True, name='outside_the_weights')
    return variable_model_fn()

  def frozen_first_layer():
    keras = keras_model()
    keras.layers[1].trainable = False
    return tff.learning.models.from_keras_model(
        keras, loss=mlp.loss_fn(), input_spec=mlp.element_spec(SHAPE))
  for model_fn in (variable_model_fn, conv_model_fn, bn_regularized_model_fn,
                   frozen_first_layer):
    assert fed_avg.trainables_are_weights(model_fn), model_fn.__name__
  assert not fed_avg.trainables_are_weights(with_extra_variable)
  process = fed_avg.build_variable_model_fed_avg(
      with_extra_variable,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1))
  assert _draws_random_numbers(process.next)
