"""Fully connected classifier like the Per-FedAvg paper's MNIST model.

Fallah et al. (2020) use two hidden layers of 80 and 60 units with ELU
activations: logits = W3 elu(W2 elu(W1 flatten(x) + b1) + b2) + b3. Loss: mean
sparse softmax cross-entropy on the logits.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks

PAPER_HIDDEN_UNITS = (80, 60)


def _check_shape(input_shape) -> tuple:
  shape = tuple(input_shape)
  if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
    raise checks.ArgumentError('input_shape', 'must be a non-empty tuple of '
                               f'ints >= 1, got {input_shape!r}')
  return shape


def create_mlp(input_shape: Sequence[int], num_classes: int, *,
               hidden_units: Sequence[int] = PAPER_HIDDEN_UNITS,
               activation: str = 'elu',
               seed: Optional[int] = 0) -> tf.keras.Model:
  """Keras MLP producing logits; inputs of rank > 1 are flattened first."""
  shape = _check_shape(input_shape)
  checks.integer('num_classes', num_classes, 2)
  if any(int(u) < 1 for u in hidden_units):
    raise checks.ArgumentError('hidden_units', f'must be ints >= 1, got '
                               f'{hidden_units!r}')
  init = lambda i: tf.keras.initializers.GlorotUniform(
      None if seed is None else seed + i)
  inputs = tf.keras.Input(shape=shape, dtype=tf.float32)
  h = tf.keras.layers.Flatten()(inputs) if len(shape) > 1 else inputs
  for i, units in enumerate(hidden_units):
    h = tf.keras.layers.Dense(int(units), activation=activation,
                              kernel_initializer=init(i))(h)
  logits = tf.keras.layers.Dense(num_classes,
                                 kernel_initializer=init(len(hidden_units)))(h)
  return tf.keras.Model(inputs, logits)


def element_spec(input_shape: Sequence[int]) -> collections.OrderedDict:
  """Spec of one batch: x [None, *input_shape] float32, y [None] int32."""
  return collections.OrderedDict(
      x=tf.TensorSpec([None, *_check_shape(input_shape)], tf.float32),
      y=tf.TensorSpec([None], tf.int32))


def loss_fn() -> tf.keras.losses.Loss:
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp_model_fn(input_shape: Sequence[int], num_classes: int, *,
                 hidden_units: Sequence[int] = PAPER_HIDDEN_UNITS,
                 activation: str = 'elu', seed: Optional[int] = 0):
  """No-arg callable returning the MLP as a `tff.learning.models.VariableModel`
  (sparse softmax cross-entropy, accuracy)."""
  shape = _check_shape(input_shape)
  hidden_units = tuple(hidden_units)

  def model_fn():
    return tff.learning.models.from_keras_model(
        create_mlp(shape, num_classes, hidden_units=hidden_units,
                   activation=activation, seed=seed),
        loss=loss_fn(),
        input_spec=element_spec(shape),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
  return model_fn


def create_digits_mlp(seed: Optional[int] = 0) -> tf.keras.Model:
  """The paper's MLP for scikit-learn's 8x8 digits: 64 -> 80 -> 60 -> 10
  logits (ELU), 10,670 parameters."""
  return create_mlp((64,), 10, seed=seed)
