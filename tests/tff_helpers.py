"""Helpers shared by the test modules, each once: random softmax-regression
clients and weights (Per-FedAvg tests), the evaluation tests' clients and
awkward models, the training-program tests' config and stub process, and a
counter of TFF compilations. Shared pytest fixtures are in conftest.py."""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.models import linear
from tests import numpy_reference as ref

# ---- Per-FedAvg: softmax regression, random clients and weights ----

DIM, CLASSES = 6, 4
MODEL_FN = linear.softmax_regression_model_fn(DIM, CLASSES)


def random_client(rng, n, dim=DIM, classes=CLASSES):
  """(x, y): `n` standard-normal inputs and uniform labels; `rng` is a numpy
  Generator (drawn from) or a seed."""
  rng = np.random.default_rng(rng)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  return x, y


def random_weights(rng, dim=DIM, classes=CLASSES):
  """(kernel, bias) of a softmax regression; `rng` as in `random_client`."""
  rng = np.random.default_rng(rng)
  return (rng.normal(scale=0.5, size=(dim, classes)).astype(np.float32),
          rng.normal(scale=0.5, size=(classes,)).astype(np.float32))


def dataset(x, y, batch_size=None):
  """OrderedDict(x, y) examples, in batches of `batch_size` (None: not
  batched)."""
  ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
  return ds if batch_size is None else ds.batch(batch_size)


def ref_batches(x, y, batch_size):
  """The batches of the numpy reference (float64 inputs)."""
  return ref.batches_of(x.astype(np.float64), y, batch_size)


def f64(w):
  return tuple(np.asarray(a, np.float64) for a in w)


def trainable(process, state):
  """The trainable weights of `state` as numpy arrays."""
  return [np.asarray(t) for t in process.get_model_weights(state).trainable]


def with_trainable(process, state, w):
  """`state` with the trainable weights `w`."""
  weights = process.get_model_weights(state)
  return process.set_model_weights(state, tff.learning.models.ModelWeights(
      trainable=type(weights.trainable)(w),
      non_trainable=weights.non_trainable))


def with_delta(process, state, delta):
  """`state` with HF's radius `delta` (a hyperparameter in the state: the
  process is not rebuilt)."""
  hparams = process.get_hparams(state)
  hparams['client_work']['delta'] = np.float32(delta)
  return process.set_hparams(state, hparams)


class CompileCounter:
  """Counts TFF compilations in `context` (a TFF SyncExecutionContext or
  the outer ring's `ExecutionContext`; default: the current one)."""

  def __init__(self, context=None):
    if context is None:
      context = tff.framework.get_context_stack().current
    context = getattr(context, 'context', context)
    self._pipeline = context._async_context._compiler_pipeline  # pylint: disable=protected-access
    self._inner = self._pipeline._compiler_fn  # pylint: disable=protected-access
    self.count = 0

  def __enter__(self):
    def counting(comp):
      self.count += 1
      return self._inner(comp)
    self._pipeline._compiler_fn = counting  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    self._pipeline._compiler_fn = self._inner  # pylint: disable=protected-access


# ---- Personalized evaluation: clients, weights, awkward clients ----

EVAL_DIM, EVAL_CLASSES = 4, 3


def eval_initial_weights(seed=3):
  """(kernel, bias) of an EVAL_DIM x EVAL_CLASSES softmax regression."""
  rng = np.random.default_rng(seed)
  kernel = rng.normal(0, 0.5, (EVAL_DIM, EVAL_CLASSES)).astype(np.float32)
  bias = rng.normal(0, 0.1, EVAL_CLASSES).astype(np.float32)
  return kernel, bias


def model_weights(kernel, bias):
  return tff.learning.models.ModelWeights(trainable=[kernel, bias],
                                          non_trainable=[])


def eval_client(seed, n_train, n_test, shift):
  """(x_train, y_train, x_test, y_test) of an EVAL_DIM-input client."""
  rng = np.random.default_rng(seed)
  x_tr = rng.normal(shift, 1, (n_train, EVAL_DIM)).astype(np.float32)
  y_tr = rng.integers(0, EVAL_CLASSES, n_train).astype(np.int32)
  # Test labels differ in distribution from train, so a step on the test data
  # would give different numbers than a step on the train data.
  x_te = rng.normal(-shift, 1, (n_test, EVAL_DIM)).astype(np.float32)
  y_te = ((np.arange(n_test) + seed) % EVAL_CLASSES).astype(np.int32)
  return x_tr, y_tr, x_te, y_te


# Awkward clients (empty train, empty test, one example) on every model.
#
# TFF's EMNIST has writers whose test split is empty, and writers with one or
# two train examples. A forward pass of the EMNIST CNN on zero examples fails
# on CPU (TensorFlow's oneDNN fused Conv2D returns its input for an empty
# batch: "input depth must be evenly divisible by filter depth: 1 vs 32"), so
# the evaluation must never run the model on an empty batch.

AWKWARD_MODELS = ('linear', 'digits_mlp', 'emnist_cnn', 'shakespeare_lstm')


def awkward_models():
  """{name: (model_fn, keras_model_fn, loss_fn, batch spec, ignore_label)}
  of AWKWARD_MODELS."""
  from perfed_tff.models import emnist as emnist_models  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import shakespeare as shakespeare_models  # pylint: disable=g-import-not-at-top
  ce = lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  return {
      'linear': (linear.softmax_regression_model_fn(EVAL_DIM, EVAL_CLASSES),
                 lambda: linear.create_softmax_regression(EVAL_DIM,
                                                          EVAL_CLASSES),
                 ce, linear.element_spec(EVAL_DIM), None),
      'digits_mlp': (mlp.mlp_model_fn((64,), 10), mlp.create_digits_mlp,
                     mlp.loss_fn, mlp.element_spec((64,)), None),
      'emnist_cnn': (emnist_models.emnist_cnn_model_fn(10),
                     lambda: emnist_models.create_emnist_cnn(10),
                     emnist_models.loss_fn, emnist_models.element_spec(),
                     None),
      'shakespeare_lstm': (
          shakespeare_models.char_lstm_model_fn(20, 6, lstm_units=8),
          lambda: shakespeare_models.create_char_lstm(20, 6, lstm_units=8),
          shakespeare_models.loss_fn, shakespeare_models.element_spec(6),
          shakespeare_models.PAD_ID),
  }


def examples(spec, n, seed):
  """`n` unbatched examples of the batch `spec` (labels >= 1, so a pad id 0
  never hides them)."""
  rng = np.random.default_rng(seed)
  out = collections.OrderedDict()
  for key, s in spec.items():
    shape = [n] + s.shape.as_list()[1:]
    if s.dtype == tf.float32:
      out[key] = rng.random(shape).astype(np.float32)
    else:
      out[key] = rng.integers(1, 3, shape).astype(s.dtype.as_numpy_dtype)
  return out


def initial_weights(model_fn):
  """The initial model weights of `model_fn`, as Per-FedAvg starts."""
  from perfed_tff import process_arguments  # pylint: disable=g-import-not-at-top
  return process_arguments.initial_model_weights_computation(model_fn)()


# ---- Training program: a small synthetic run, a stub process ----

# `runtime` is the ring's (each ring's conftest sets it for its tests).
PROGRAM_CONFIG = dict(
    algorithm='per_fedavg_fo', dataset='synthetic', rounds=4,
    clients_per_round=3, local_steps=1, batch_size=8, seed=1,
    checkpoint_every=2, eval_every=0, progress=False, runtime='tff')


# The fault tests' run, as overrides of PROGRAM_CONFIG: 2 local steps, a
# checkpoint every round, the default seed.
FAULTS_RUN = dict(local_steps=2, checkpoint_every=1, seed=0)


def training_config(root_output_dir, **overrides):
  """The validated TrainingConfig of PROGRAM_CONFIG with `overrides`."""
  from perfed_tff.program import settings as settings_lib  # pylint: disable=g-import-not-at-top
  return settings_lib.validate(settings_lib.TrainingConfig(**dict(
      PROGRAM_CONFIG, root_output_dir=str(root_output_dir), **overrides)))


class StubProcess:
  """A LearningProcess stand-in for 3 clients a round: w += 1 per round;
  the loss is 1/round, NaN at `nan_round`."""

  def __init__(self, nan_round=None):
    self.nan_round = nan_round

  def initialize(self):
    return collections.OrderedDict(w=np.zeros(3, np.float32),
                                   count=np.int64(0))

  def next(self, state, data):
    assert len(data) == 3
    r = int(state['count']) + 1
    loss = float('nan') if r == self.nan_round else 1.0 / r
    new = collections.OrderedDict(w=state['w'] + 1.0, count=np.int64(r))
    metrics = collections.OrderedDict(client_work=collections.OrderedDict(
        train=collections.OrderedDict(loss=np.float32(loss))))
    return tff.learning.templates.LearningProcessOutput(new, metrics)

  def get_model_weights(self, state):
    return tff.learning.models.ModelWeights(trainable=[state['w']],
                                            non_trainable=[])
