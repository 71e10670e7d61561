"""The personalized evaluation in TFF's terms: TFF's own
`build_personalization_eval_computation` (same strategy: k SGD steps at alpha
on the client's train batches in order) gives the same per-client accuracies;
a FunctionalModel and TFF's unbatched client input are accepted."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import personalization_eval as evaluation
from perfed_tff.models import linear

DIM, CLASSES = 5, 3
ALPHA, BATCH, STEPS = 1.0, 4, (1, 3)


def _client(seed, n_train, n_test):
  rng = np.random.default_rng(seed)
  rule = rng.normal(0, 2.0, (DIM, CLASSES))   # the client's own labelling
  def part(n, shift):
    x = rng.normal(shift, 1.0, (n, DIM)).astype(np.float32)
    y = np.argmax(x @ rule, axis=1).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x, y=y))
  return collections.OrderedDict(train_data=part(n_train, 0.5),
                                 test_data=part(n_test, -0.5))


# Unbatched, as TFF's computation takes them; the 3rd client has train data
# for 2 of the 3 steps only.
CLIENTS = [_client(0, 14, 9), _client(1, 20, 6), _client(2, 7, 11)]


def _weights(seed=3):
  rng = np.random.default_rng(seed)
  return tff.learning.models.ModelWeights(
      trainable=[rng.normal(0, 0.7, (DIM, CLASSES)).astype(np.float32),
                 rng.normal(0, 0.2, CLASSES).astype(np.float32)],
      non_trainable=[])


@tf.function
def _evaluate(model, test_data):
  """TFF-style evaluation with the model's own Keras metrics."""
  model.reset_metrics()
  for batch in test_data.batch(100):
    model.forward_pass(batch, training=False)
  m = model.report_local_unfinalized_metrics()
  total, count = m['sparse_categorical_accuracy']
  fingerprint = test_data.reduce(
      0.0, lambda s, e: s + tf.reduce_sum(e['x']))
  return collections.OrderedDict(accuracy=total / count,
                                 loss=m['loss'][0] / m['loss'][1],
                                 fingerprint=fingerprint)


def _k_sgd_steps(k):
  def builder():
    @tf.function
    def personalize(model, train_data, test_data):
      variables = model.trainable_variables
      for batch in train_data.batch(BATCH).take(k):
        with tf.GradientTape() as tape:
          out = model.forward_pass(batch, training=True)
        for v, g in zip(variables, tape.gradient(out.loss, variables)):
          v.assign_sub(ALPHA * g)
      return _evaluate(model, test_data)
    return personalize
  return builder


@pytest.fixture(scope='module')
def tff_results():
  model_fn = linear.softmax_regression_model_fn(DIM, CLASSES)
  computation = tff.learning.algorithms.build_personalization_eval_computation(
      model_fn,
      collections.OrderedDict((f'step_{k}', _k_sgd_steps(k)) for k in STEPS),
      _evaluate, max_num_clients=10)
  out = computation(_weights(), CLIENTS)
  # Reservoir sampling may reorder clients: key them by their test data.
  order = [float(f) for f in out['baseline_metrics']['fingerprint']]
  return out, order


def _fingerprint(client):
  return float(sum(e['x'].sum() for e in client['test_data'].as_numpy_iterator()))


def _check_against_tff(ours, tff_results):
  out, order = tff_results
  assert len(ours) == len(CLIENTS)
  for client, result in zip(CLIENTS, ours):
    i = int(np.argmin([abs(f - _fingerprint(client)) for f in order]))
    for key, tff_key in [('step_0', 'baseline_metrics')] + [
        (f'step_{k}', f'step_{k}') for k in STEPS]:
      np.testing.assert_allclose(result['metrics'][key]['accuracy'],
                                 out[tff_key]['accuracy'][i], atol=1e-6,
                                 err_msg=key)
      np.testing.assert_allclose(result['metrics'][key]['loss'],
                                 out[tff_key]['loss'][i], rtol=1e-5,
                                 err_msg=key)
  # Not vacuous: adaptation changed the accuracies of some client.
  assert any(abs(r['metrics']['step_3']['accuracy'] -
                 r['metrics']['step_0']['accuracy']) > 0.05 for r in ours), [
                     (r['metrics']['step_0']['accuracy'],
                      r['metrics']['step_3']['accuracy']) for r in ours]


def test_variable_model_with_tff_client_input_matches_tff(tff_results):
  ours = evaluation.build_personalized_evaluation(
      linear.softmax_regression_model_fn(DIM, CLASSES), alpha=ALPHA,
      adaptation_steps=STEPS, input_format='unbatched', batch_size=BATCH)
  result = ours(_weights(), CLIENTS)
  _check_against_tff(result, tff_results)
  assert [int(r['num_adaptation_steps']) for r in result] == [3, 3, 2]


def test_functional_model_matches_tff(tff_results):
  functional = tff.learning.models.functional_model_from_keras(
      linear.create_softmax_regression(DIM, CLASSES),
      loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=linear.element_spec(DIM))
  ours = evaluation.build_personalized_evaluation(
      functional, alpha=ALPHA, adaptation_steps=STEPS,
      input_format='unbatched', batch_size=BATCH)
  _check_against_tff(ours(_weights(), CLIENTS), tff_results)
  # The batched form (today's input) gives the same numbers.
  batched = evaluation.build_personalized_evaluation(
      functional, alpha=ALPHA, adaptation_steps=STEPS)
  _check_against_tff(batched(_weights(), [
      collections.OrderedDict(train_data=c['train_data'].batch(BATCH),
                              test_data=c['test_data'].batch(5))
      for c in CLIENTS]), tff_results)


def test_bad_input_format():
  with pytest.raises(ValueError, match='`input_format`'):
    evaluation.build_personalized_evaluation(
        linear.softmax_regression_model_fn(DIM, CLASSES), alpha=0.1,
        input_format='ragged')
