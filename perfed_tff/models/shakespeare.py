"""Next-character LSTM for Shakespeare (McMahan et al. 2017; TFF's
`create_recurrent_model`), with a loss and accuracy that ignore padding.

x [L] int token ids -> Embedding(vocab_size, 8, mask_zero; computed as
one_hot(x) @ E so its gradient is dense) -> LSTM(256)
-> LSTM(256) -> Dense(vocab_size) logits at every position.
Loss: mean cross-entropy over the positions whose target is not padding,
  sum_t m_t CE(y_t, logits_t) / sum_t m_t,  m_t = [y_t != pad];
accuracy: the same mask (padding targets are neither right nor wrong).
"""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks

PAD_ID = 0
EMBEDDING_DIM = 8
LSTM_UNITS = 256


def _mask(y_true, pad_id: int, dtype, sample_weight=None):
  """1 where the target is not `pad_id` (times `sample_weight`), else 0."""
  mask = tf.cast(tf.not_equal(tf.cast(y_true, tf.int64), pad_id), dtype)
  if sample_weight is not None:
    mask *= tf.cast(sample_weight, dtype)
  return mask


class _PadIdConfig:
  """`pad_id` in the Keras config of a masked loss or metric."""

  def get_config(self):
    config = super().get_config()
    config['pad_id'] = self.pad_id
    return config


class MaskedSparseCategoricalCrossentropy(_PadIdConfig, tf.keras.losses.Loss):
  """Mean softmax cross-entropy (logits) over targets != `pad_id`.

  Unlike Keras' reduction, the mean is over the unmasked tokens of the whole
  batch; a batch with no such token has loss 0.
  """

  def __init__(self, pad_id: int = PAD_ID, name: str = 'masked_sparse_ce',
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.pad_id = int(pad_id)

  def call(self, y_true, y_pred):  # Per-token losses (mask applied in __call__).
    return tf.keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)

  def __call__(self, y_true, y_pred, sample_weight=None):
    ce = self.call(y_true, y_pred)
    mask = _mask(y_true, self.pad_id, ce.dtype, sample_weight)
    return tf.math.divide_no_nan(tf.reduce_sum(ce * mask), tf.reduce_sum(mask))


class MaskedSparseCategoricalAccuracy(
    _PadIdConfig, tf.keras.metrics.SparseCategoricalAccuracy):
  """Accuracy over the targets that are not `pad_id`."""

  def __init__(self, pad_id: int = PAD_ID, name: str = 'accuracy', dtype=None):
    super().__init__(name=name, dtype=dtype)
    self.pad_id = int(pad_id)

  def update_state(self, y_true, y_pred, sample_weight=None):
    mask = _mask(y_true, self.pad_id, self.dtype, sample_weight)
    num_classes = tf.shape(y_pred)[-1]
    return super().update_state(tf.reshape(y_true, [-1]),
                                tf.reshape(y_pred, [-1, num_classes]),
                                tf.reshape(mask, [-1]))


class NumTokens(_PadIdConfig, tf.keras.metrics.Sum):
  """Number of non-padding target tokens seen."""

  def __init__(self, pad_id: int = PAD_ID, name: str = 'num_tokens',
               dtype=tf.float32):
    super().__init__(name=name, dtype=dtype)
    self.pad_id = int(pad_id)

  def update_state(self, y_true, y_pred=None, sample_weight=None):
    del y_pred, sample_weight
    return super().update_state(
        tf.reduce_sum(_mask(y_true, self.pad_id, self.dtype)))


class OneHotEmbedding(tf.keras.layers.Layer):
  """Embedding as one_hot(x) @ E, with Keras' `mask_zero` mask (x != 0).

  Same output as `tf.keras.layers.Embedding`, but the gradient with respect
  to E is a dense tensor instead of `tf.IndexedSlices`, so weight arithmetic
  such as w - alpha * g (Per-FedAvg's inner step) works on it unchanged.
  """

  def __init__(self, vocab_size: int, output_dim: int, seed=None, **kwargs):
    super().__init__(**kwargs)
    self.vocab_size = int(vocab_size)
    self.output_dim = int(output_dim)
    self.seed = seed
    self.supports_masking = True

  def build(self, input_shape):
    self.embeddings = self.add_weight(
        name='embeddings', shape=(self.vocab_size, self.output_dim),
        initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05,
                                                        seed=self.seed))
    super().build(input_shape)

  def call(self, inputs):
    one_hot = tf.one_hot(tf.cast(inputs, tf.int32), self.vocab_size,
                         dtype=self.embeddings.dtype)
    return tf.einsum('...v,vd->...d', one_hot, self.embeddings)

  def compute_mask(self, inputs, mask=None):
    return tf.not_equal(inputs, 0)

  def get_config(self):
    config = super().get_config()
    config.update(vocab_size=self.vocab_size, output_dim=self.output_dim,
                  seed=self.seed)
    return config


def _check(vocab_size, sequence_length):
  checks.integer('vocab_size', vocab_size, 2)
  checks.integer('sequence_length', sequence_length, 1)


def create_char_lstm(vocab_size: int, sequence_length: int, *,
                     lstm_units: int = LSTM_UNITS,
                     embedding_dim: int = EMBEDDING_DIM,
                     seed: Optional[int] = 0) -> tf.keras.Model:
  """Keras char model: embedding, two stacked LSTMs, dense logits per step."""
  _check(vocab_size, sequence_length)
  init = lambda i: tf.keras.initializers.HeNormal(
      None if seed is None else seed + i)
  inputs = tf.keras.Input(shape=(sequence_length,), dtype=tf.int32)
  h = OneHotEmbedding(vocab_size, embedding_dim, seed=seed)(inputs)
  for i in range(2):
    h = tf.keras.layers.LSTM(lstm_units, return_sequences=True,
                             kernel_initializer=init(i),
                             recurrent_initializer=tf.keras.initializers.Orthogonal(
                                 seed=None if seed is None else seed + 10 + i))(h)
  logits = tf.keras.layers.Dense(
      vocab_size, kernel_initializer=tf.keras.initializers.GlorotUniform(
          None if seed is None else seed + 2))(h)
  return tf.keras.Model(inputs, logits)


def element_spec(sequence_length: int) -> collections.OrderedDict:
  """Spec of one batch: x, y [None, sequence_length] int32."""
  return collections.OrderedDict(
      x=tf.TensorSpec([None, sequence_length], tf.int32),
      y=tf.TensorSpec([None, sequence_length], tf.int32))


def loss_fn(pad_id: int = PAD_ID) -> tf.keras.losses.Loss:
  return MaskedSparseCategoricalCrossentropy(pad_id)


def char_lstm_model_fn(vocab_size: int, sequence_length: int, *,
                       pad_id: int = PAD_ID, lstm_units: int = LSTM_UNITS,
                       seed: Optional[int] = 0):
  """No-arg callable returning the char LSTM as a
  `tff.learning.models.VariableModel` (masked loss, masked accuracy and the
  count of non-padding tokens)."""
  _check(vocab_size, sequence_length)

  def model_fn():
    return tff.learning.models.from_keras_model(
        create_char_lstm(vocab_size, sequence_length, lstm_units=lstm_units,
                         seed=seed),
        loss=loss_fn(pad_id),
        input_spec=element_spec(sequence_length),
        metrics=[MaskedSparseCategoricalAccuracy(pad_id),
                 NumTokens(pad_id)])
  return model_fn
