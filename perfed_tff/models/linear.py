"""Softmax (multinomial logistic) regression: logits = x W + b."""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff


def create_softmax_regression(input_dim: int, num_classes: int,
                              seed: Optional[int] = 0) -> tf.keras.Model:
  """Keras model: one Dense layer producing logits (no activation)."""
  init = tf.keras.initializers.GlorotUniform(seed)
  inputs = tf.keras.Input(shape=(input_dim,), dtype=tf.float32)
  logits = tf.keras.layers.Dense(num_classes, kernel_initializer=init,
                                 bias_initializer='zeros')(inputs)
  return tf.keras.Model(inputs, logits)


def element_spec(input_dim: int) -> collections.OrderedDict:
  """Spec of one batch: OrderedDict(x=[None, input_dim] float32, y=[None] int32)."""
  return collections.OrderedDict(
      x=tf.TensorSpec([None, input_dim], tf.float32),
      y=tf.TensorSpec([None], tf.int32))


def softmax_regression_model_fn(input_dim: int, num_classes: int, seed=0):
  """No-arg callable returning a `tff.learning.models.VariableModel`
  (mean sparse softmax cross-entropy loss, accuracy metric)."""

  def model_fn():
    return tff.learning.models.from_keras_model(
        create_softmax_regression(input_dim, num_classes, seed),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        input_spec=element_spec(input_dim),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
  return model_fn
