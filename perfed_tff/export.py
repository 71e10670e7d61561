"""Export: the global model as Keras / SavedModel, and a user's personalized
model.

Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020,
https://arxiv.org/abs/2002.07948) learns an initial model w meant to be
adapted: user i's personalized model is

    w_0 = w,   w_k = w_{k-1} - alpha * grad f_i(w_{k-1}; B_k),   k = 1..K,

K SGD steps at alpha on the user's own train batches B_1, B_2, ... in order
(K = 1 is the paper's protocol). This is the adaptation that
`perfed_tff.personalization_eval` measures; `personalized_model_for_client`
takes exactly the batches `evaluate_population` takes (same seed), so its test
accuracy is that user's k-step accuracy there.

    weights = process.get_model_weights(state)
    model = perfed_tff.export.keras_model(weights, task.keras_model_fn)
    perfed_tff.export.save_keras_model(weights, task.keras_model_fn, '/tmp/m')

Weights of a VariableModel or of a `tff.learning.models.FunctionalModel`
built from the same Keras architecture fit (same variable order).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import model_oracles
from perfed_tff import personalization_data

KerasModelFn = Callable[[], tf.keras.Model]


def _as_model_weights(model_weights) -> tff.learning.models.ModelWeights:
  if isinstance(model_weights, tff.learning.models.ModelWeights):
    return model_weights
  if isinstance(model_weights, (tuple, list)) and len(model_weights) == 2:
    return tff.learning.models.ModelWeights(*model_weights)
  raise TypeError('`model_weights` must be tff.learning.models.ModelWeights '
                  '(e.g. process.get_model_weights(state)), got '
                  f'{type(model_weights)}.')


def keras_model(model_weights, keras_model_fn: KerasModelFn, *,
                compile_kwargs: Optional[dict] = None) -> tf.keras.Model:
  """The model w as a `tf.keras.Model`: `keras_model_fn()` (the architecture
  the process was trained with, e.g. `task.keras_model_fn`) with w assigned.

  Args:
    model_weights: `tff.learning.models.ModelWeights` (trainable,
      non_trainable), e.g. `process.get_model_weights(state)`.
    keras_model_fn: no-arg callable building the Keras model.
    compile_kwargs: if given, `model.compile(**compile_kwargs)`.

  Raises:
    ValueError: the weights do not fit the model's variables.
  """
  weights = _as_model_weights(model_weights)
  model = keras_model_fn()
  if not isinstance(model, tf.keras.Model):
    raise TypeError('`keras_model_fn` must return a tf.keras.Model, got '
                    f'{type(model)}.')
  want = [tuple(v.shape) for v in model.trainable_weights]
  got = [tuple(np.shape(w)) for w in weights.trainable]
  if want != got or len(model.non_trainable_weights) != len(
      weights.non_trainable):
    raise checks.ArgumentError(
        'model_weights', f'do not fit the Keras model: trainable shapes {got}'
        f', the model has {want}')
  weights.assign_weights_to(model)
  if compile_kwargs:
    model.compile(**compile_kwargs)
  return model


def save_keras_model(model_weights, keras_model_fn: KerasModelFn,
                     path: str) -> tf.keras.Model:
  """Writes the model w as a SavedModel directory at `path`
  (`tf.keras.models.load_model(path, compile=False)` reads it back) and
  returns the Keras model."""
  path = checks.writable_dir('path', path)
  model = keras_model(model_weights, keras_model_fn)
  tf.keras.models.save_model(model, path, save_format='tf',
                             include_optimizer=False)
  return model


def personalize(model_weights, keras_model_fn: KerasModelFn,
                loss_fn: Callable[[], tf.keras.losses.Loss],
                batches: tf.data.Dataset, *, alpha: float,
                num_steps: int) -> tf.keras.Model:
  """A user's personalized model: K = `num_steps` SGD steps at alpha from w,
  the k-th on the k-th batch of `batches` (the user's train batches;
  fewer steps when they run out), in training mode, with the model's mean
  loss `loss_fn()` (e.g. `task.loss_fn`).

  Returns the adapted `tf.keras.Model`.
  """
  alpha = checks.positive_float('alpha', alpha)
  num_steps = checks.integer('num_steps', num_steps, 1)
  model = keras_model(model_weights, keras_model_fn)
  # The Keras model as a VariableModel on the same variables (its loss is
  # `loss_fn()` plus the model's regularization losses, as Keras trains it).
  oracle = model_oracles.oracle_for(tff.learning.models.from_keras_model(
      model, loss=loss_fn(), input_spec=batches.element_spec))
  variables = model.trainable_variables

  @tf.function(autograph=False)
  def adapt(initial):
    final, _, _ = model_oracles.sgd_steps(oracle, initial, batches, alpha,
                                          num_steps)
    return final

  for v, w in zip(variables, adapt(tuple(tf.identity(v) for v in variables))):
    v.assign(w)
  return model


def personalized_model_for_client(task, model_weights, client_id, *,
                                  alpha: float, num_steps: int,
                                  batch_size: Optional[int] = 32,
                                  seed: int = 0,
                                  protocol: str = 'heldout'
                                  ) -> tf.keras.Model:
  """`personalize` on user `client_id` of `task` (a
  `perfed_tff.data.task.FederatedTask`) with the very batches that
  `perfed_tff.program.population_eval.evaluate_population(...,
  adapt_batch_size=batch_size, seed=seed, protocol=protocol)` adapts on
  (seeded by client id), so the model's test accuracy equals that user's
  `num_steps`-step accuracy there.
  """
  personalization_data.check_protocol(protocol, 'protocol')
  train, test = task.train, task.test
  if client_id not in test.client_ids:
    if task.unseen is None or client_id not in task.unseen[1].client_ids:
      raise checks.ArgumentError(
          'client_id', f'is not a user of the task, got {client_id!r}')
    train, test = task.unseen
  source = test if protocol == 'paper' else train
  batches = personalization_data.adaptation_batches(
      source.create_tf_dataset_for_client(client_id), num_steps=num_steps,
      batch_size=batch_size,
      seed=personalization_data.adaptation_seed(seed, client_id))
  return personalize(model_weights, task.keras_model_fn, task.loss_fn,
                     batches, alpha=alpha, num_steps=num_steps)


def accuracy(model: tf.keras.Model, dataset: tf.data.Dataset,
             ignore_label: Optional[int] = None,
             batch_size: int = 256) -> float:
  """argmax(model(x), -1) == y averaged over label entries of an
  (unbatched) dataset, as `personalization_eval` measures it."""
  correct = entries = 0.0
  for batch in dataset.batch(batch_size):
    x, y = model_oracles.split_batch(batch)
    predictions = model(x, training=False).numpy()
    labels = np.reshape(np.asarray(y), predictions.shape[:-1])
    hit = np.argmax(predictions, axis=-1) == labels
    if ignore_label is None:
      correct += hit.sum()
      entries += hit.size
    else:
      mask = labels != ignore_label
      correct += (hit & mask).sum()
      entries += mask.sum()
  return float(correct / entries) if entries else float('nan')
