"""TFF's standard EMNIST CNN (`create_conv_dropout_model` in
`tff.simulation.baselines.emnist`), emitting logits.

x [28, 28, 1] -> Conv2D(32, 3x3, relu) -> Conv2D(64, 3x3, relu)
-> MaxPool(2x2) -> Dropout(0.25) -> Flatten -> Dense(128, relu)
-> Dropout(0.5) -> Dense(num_classes) logits (10 digits or 62 characters).
1,199,882 parameters for 10 classes. TFF's version ends in a softmax; here the
loss takes logits (`from_logits=True`), which is numerically safer.
"""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks

IMAGE_SHAPE = (28, 28, 1)


def _check_classes(num_classes) -> int:
  if num_classes not in (10, 62):
    raise checks.ArgumentError('num_classes', 'must be 10 (digits) or 62 (all '
                               f'EMNIST characters), got {num_classes!r}')
  return num_classes


def create_emnist_cnn(num_classes: int = 10,
                      seed: Optional[int] = 0) -> tf.keras.Model:
  """Keras EMNIST CNN (two conv layers, max-pool, dropout, dense) -> logits."""
  _check_classes(num_classes)
  init = lambda i: tf.keras.initializers.GlorotUniform(
      None if seed is None else seed + i)
  return tf.keras.Sequential([
      tf.keras.layers.Conv2D(32, (3, 3), activation='relu',
                             input_shape=IMAGE_SHAPE, kernel_initializer=init(0)),
      tf.keras.layers.Conv2D(64, (3, 3), activation='relu',
                             kernel_initializer=init(1)),
      tf.keras.layers.MaxPool2D(pool_size=(2, 2)),
      tf.keras.layers.Dropout(0.25),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(128, activation='relu', kernel_initializer=init(2)),
      tf.keras.layers.Dropout(0.5),
      tf.keras.layers.Dense(num_classes, kernel_initializer=init(3)),
  ])


def element_spec() -> collections.OrderedDict:
  """Spec of one batch: x [None, 28, 28, 1] float32, y [None] int32."""
  return collections.OrderedDict(
      x=tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32),
      y=tf.TensorSpec([None], tf.int32))


def loss_fn() -> tf.keras.losses.Loss:
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def emnist_cnn_model_fn(num_classes: int = 10, seed: Optional[int] = 0):
  """No-arg callable returning the CNN as a `tff.learning.models.VariableModel`
  (sparse softmax cross-entropy, accuracy)."""
  _check_classes(num_classes)

  def model_fn():
    return tff.learning.models.from_keras_model(
        create_emnist_cnn(num_classes, seed),
        loss=loss_fn(),
        input_spec=element_spec(),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
  return model_fn
