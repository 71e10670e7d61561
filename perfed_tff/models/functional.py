"""Keras models as FunctionalModels whose randomness and statistics the
training controls.

`functional_model(keras_model_fn, loss_fn, input_spec, metrics_constructor)`
is `tff.learning.models.functional_model_from_keras` (its initial weights,
loss, metrics and `predict_on_batch`: a `KerasFunctionalModel` is a TFF
`FunctionalModel`) with one more method that the library's oracles call,

  forward(model_weights, x, *, training, seed=None)
      -> Forward(predictions, non_trainable, regularization)

which builds the Keras model in the caller's graph on the given weights
(TFF's own trick: a variable creator hands out the weight tensors) and

* **seeds its random layers.** With `seed` (an int64 tensor of shape [2]),
  every `Dropout` (`SpatialDropout1D/2D/3D` included), `GaussianDropout` and
  `GaussianNoise` layer draws from stateless ops, the k-th random layer of
  the model with `tf.random.experimental.stateless_fold_in(seed, k)`: its
  masks are a pure function of the seed, whatever runs concurrently. The
  client work derives the seed of a pass from the pass's batch, its local
  step and its role (`perfed_tff.model_oracles.pass_seed`). Without a seed
  the layers draw as Keras draws (stateful). Another random layer (Keras's
  `BaseRandomLayer`: `AlphaDropout`, random augmentation, a user's own) is
  not seeded: `unseeded_random_layers` names them, and the builders log
  one line saying such a model cannot be made reproducible.
* **returns the statistics a training pass updates.** In training mode a
  `BatchNormalization` layer normalizes with the batch's statistics and
  updates its moving mean and variance exactly as Keras does (fused or not,
  Bessel's correction included: Keras's own update code runs, its two
  assignment hooks hand the new values back instead of assigning them);
  `non_trainable` is the model's non-trainable weights after the pass (the
  given ones where nothing changed; in inference mode, the given ones).
* **returns the regularization losses** (`sum(model.losses)`: kernel and
  activity regularizers), which the oracles add to the loss, as
  `tff.learning.models.from_keras_model` does (TFF's `functional_model_from_
  keras` leaves them out).

A model without random layers, BatchNormalization or regularizers computes
exactly what TFF's `predict_on_batch` computes.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

Forward = collections.namedtuple(
    'Forward', ['predictions', 'non_trainable', 'regularization'])

_SEEDED = (tf.keras.layers.Dropout, tf.keras.layers.GaussianDropout,
           tf.keras.layers.GaussianNoise)


def _layers(model: tf.keras.Model) -> list:
  """The model's layers and nested layers, in a fixed order."""
  return [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]


def random_layers(model: tf.keras.Model) -> list:
  return [l for l in _layers(model)
          if isinstance(l, tf.keras.__internal__.layers.BaseRandomLayer)
          or isinstance(l, _SEEDED)]


def unseeded_random_layers(model: tf.keras.Model) -> list[str]:
  """Names of the random layers `forward` cannot seed."""
  return [f'{l.name} ({type(l).__name__})' for l in random_layers(model)
          if not isinstance(l, _SEEDED)
          or type(l) is tf.keras.layers.AlphaDropout]


def _noise_shape(layer, inputs):
  """The shape of a dropout layer's mask: Keras's rule for `Dropout` (None
  entries of `noise_shape` from the inputs) and the Spatial variants (one
  draw per channel)."""
  shape = tf.shape(inputs)
  if isinstance(layer, (tf.keras.layers.SpatialDropout1D,
                        tf.keras.layers.SpatialDropout2D,
                        tf.keras.layers.SpatialDropout3D)):
    rank = inputs.shape.rank
    channels_first = getattr(layer, 'data_format', None) == 'channels_first'
    if channels_first:
      return tf.concat([shape[:2], tf.ones([rank - 2], tf.int32)], 0)
    return tf.concat([shape[:1], tf.ones([rank - 2], tf.int32), shape[-1:]],
                     0)
  if layer.noise_shape is None:
    return None
  return tf.stack([shape[i] if d is None else d
                   for i, d in enumerate(layer.noise_shape)])


def _seeded_call(layer, seed, inputs, training=None, **kwargs):
  """`layer`'s call, its noise drawn from stateless ops at `seed`."""
  del kwargs
  if not training:
    return tf.identity(inputs)
  if isinstance(layer, tf.keras.layers.GaussianNoise):
    return inputs + tf.random.stateless_normal(
        tf.shape(inputs), seed, stddev=layer.stddev, dtype=inputs.dtype)
  if isinstance(layer, tf.keras.layers.GaussianDropout):
    if not 0 < layer.rate < 1:
      return tf.identity(inputs)
    stddev = np.sqrt(layer.rate / (1.0 - layer.rate))
    return inputs * tf.random.stateless_normal(
        tf.shape(inputs), seed, mean=1.0, stddev=stddev, dtype=inputs.dtype)
  if layer.rate == 0:
    return tf.identity(inputs)
  return tf.nn.experimental.stateless_dropout(
      inputs, rate=layer.rate, seed=seed,
      noise_shape=_noise_shape(layer, inputs))


def _record_statistics(layer, updates: dict) -> None:
  """Makes `layer` (a BatchNormalization) hand back the moving statistics
  Keras would assign (keyed by the id of the weight tensor)."""

  def moving_average(variable, value, momentum, inputs_size):
    decay = tf.cast(1.0 - tf.convert_to_tensor(momentum), variable.dtype)
    delta = (variable - tf.cast(value, variable.dtype)) * decay
    if inputs_size is not None:
      delta = tf.where(inputs_size > 0, delta, tf.zeros_like(delta))
    updates[id(variable)] = variable - delta
    return updates[id(variable)]

  def new_value(variable, value):
    updates[id(variable)] = tf.cast(value, variable.dtype)
    return updates[id(variable)]

  # Keras's update code calls these two (Keras 2.14's hooks; assigning them
  # on this one instance changes nothing else).
  layer._assign_moving_average = moving_average  # pylint: disable=protected-access
  layer._assign_new_value = new_value  # pylint: disable=protected-access


class KerasFunctionalModel(tff.learning.models.FunctionalModel):
  """A TFF `FunctionalModel` of a Keras model, with `forward` (module
  docstring). Built by `functional_model`."""

  def __init__(self, keras_model_fn: Callable[[], tf.keras.Model],
               base: tff.learning.models.FunctionalModel, *,
               has_random_layers: bool, has_statistics: bool):
    self._keras_model_fn = keras_model_fn
    self.has_random_layers = has_random_layers
    self.has_statistics = has_statistics

    @tf.function
    def predict_on_batch(model_weights, x, training=True):
      return self.forward(model_weights, x, training=training).predictions

    super().__init__(
        initial_weights=base.initial_weights,
        predict_on_batch_fn=predict_on_batch,
        loss_fn=base.loss,
        metrics_fns=(base.initialize_metrics_state, base.update_metrics_state,
                     base.finalize_metrics),
        input_spec=base.input_spec)

  def forward(self, model_weights, x, *, training: bool,
              seed: Optional[tf.Tensor] = None) -> Forward:
    trainable, non_trainable = (list(w) for w in model_weights)
    given = tuple(non_trainable)

    def swap(_, **kwargs):
      if kwargs.get('trainable', True):
        return trainable.pop(0)
      return non_trainable.pop(0)

    with tf.variable_creator_scope(swap):
      model = self._keras_model_fn()
    updates = {}
    for layer in _layers(model):
      if training and isinstance(layer, tf.keras.layers.BatchNormalization):
        _record_statistics(layer, updates)
    if seed is not None:
      for k, layer in enumerate(random_layers(model)):
        if isinstance(layer, _SEEDED):
          layer.call = functools.partial(
              _seeded_call, layer,
              tf.random.experimental.stateless_fold_in(seed, k))
    predictions = model(x, training=training)
    losses = model.losses
    regularization = tf.add_n(losses) if losses else None
    return Forward(predictions,
                   tuple(updates.get(id(t), t) for t in given),
                   regularization)


def functional_model(keras_model_fn: Callable[[], tf.keras.Model],
                     loss_fn: tf.keras.losses.Loss, input_spec,
                     metrics_constructor: Optional[Callable[[], Any]] = None,
                     *, name: str = 'model') -> KerasFunctionalModel:
  """The `KerasFunctionalModel` of `keras_model_fn` (a no-arg callable
  building the Keras model), `loss_fn` (a Keras loss), `input_spec` (of one
  batch) and `metrics_constructor` (as `functional_model_from_keras` takes).
  Logs one line when the model has a random layer it cannot seed."""
  base = tff.learning.models.functional_model_from_keras(
      keras_model_fn, loss_fn, input_spec=input_spec,
      metrics_constructor=metrics_constructor)
  with tf.Graph().as_default():
    model = keras_model_fn()
    has_random = bool(random_layers(model))
    unseeded = unseeded_random_layers(model)
    has_statistics = any(isinstance(l, tf.keras.layers.BatchNormalization)
                         for l in _layers(model))
  if unseeded:
    logging.warning(
        '%s cannot be made reproducible: random layers %s draw from '
        "TensorFlow's stateful generators (perfed_tff seeds Dropout, "
        'SpatialDropout*, GaussianDropout and GaussianNoise)', name,
        ', '.join(unseeded))
  return KerasFunctionalModel(keras_model_fn, base,
                              has_random_layers=has_random,
                              has_statistics=has_statistics)
