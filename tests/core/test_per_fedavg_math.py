"""Per-FedAvg weights after one round equal an independent numpy computation."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import model_oracles
from perfed_tff.models import linear
from tests import numpy_reference as ref
from tests import tff_helpers as h

DIM, CLASSES = h.DIM, h.CLASSES


def _run_one_round(process, w0, client_datasets, delta=None):
  state = process.initialize()
  if delta is not None:
    state = h.with_delta(process, state, delta)
  weights = process.get_model_weights(state)
  weights = tff.learning.models.ModelWeights(
      trainable=type(weights.trainable)(w0), non_trainable=weights.non_trainable)
  state = process.set_model_weights(state, weights)
  output = process.next(state, client_datasets)
  return output, [np.asarray(t) for t in
                  process.get_model_weights(output.state).trainable]


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
@pytest.mark.parametrize('local_steps', [1, 3])
def test_one_client_matches_numpy(variant, local_steps):
  rng = np.random.default_rng(7)
  # Several full batches and a short last one.
  x, y = h.random_client(rng, 5 * 9 + 3)
  w0 = h.random_weights(rng)
  alpha, beta, delta = 0.3, 0.2, 1e-2
  process = perfed_tff.build_per_fedavg(
      linear.softmax_regression_model_fn(DIM, CLASSES), variant=variant,
      alpha=alpha, beta=beta, delta=delta, local_steps=local_steps)
  output, got = _run_one_round(process, w0, [h.dataset(x, y, 5)])

  w64 = tuple(a.astype(np.float64) for a in w0)
  want, steps, examples = ref.client_update(
      w64, ref.batches_of(x.astype(np.float64), y, 5), variant, alpha, beta,
      delta, local_steps)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  # The round really moved the model (the check above is not vacuous).
  assert np.abs(got[0] - w0[0]).max() > 1e-3
  train = output.metrics['client_work']['train']
  assert train['num_steps'] == steps == local_steps
  assert train['num_examples'] == examples


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
def test_steps_chain_and_stop_when_data_run_out(variant):
  """tau=4 requested, data for only 2 full steps (plus a partial one)."""
  rng = np.random.default_rng(3)
  k = 2 if variant == 'fo' else 3
  x, y = h.random_client(rng, 4 * (2 * k + 1))   # 2 full steps + 1 batch
  w0 = h.random_weights(rng)
  process = perfed_tff.build_per_fedavg(
      linear.softmax_regression_model_fn(DIM, CLASSES), variant=variant,
      alpha=0.5, beta=0.5, delta=1e-2, local_steps=4)
  output, got = _run_one_round(process, w0, [h.dataset(x, y, 4)])
  want, steps, _ = ref.client_update(
      tuple(a.astype(np.float64) for a in w0),
      ref.batches_of(x.astype(np.float64), y, 4), variant, 0.5, 0.5, 1e-2, 4)
  assert steps == 2
  assert output.metrics['client_work']['train']['num_steps'] == 2
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_metrics_are_losses_at_w_on_d_and_at_w_tilde_on_d_prime():
  rng = np.random.default_rng(11)
  x, y = h.random_client(rng, 12)
  w0 = h.random_weights(rng)
  alpha = 0.4
  process = perfed_tff.build_per_fedavg(
      linear.softmax_regression_model_fn(DIM, CLASSES), variant='fo',
      alpha=alpha, beta=0.1, local_steps=1)
  output, _ = _run_one_round(process, w0, [h.dataset(x, y, 6)])
  w64 = tuple(a.astype(np.float64) for a in w0)
  d, d_prime = ref.batches_of(x.astype(np.float64), y, 6)
  w_tilde = tuple(a - alpha * g for a, g in zip(w64, ref.grad(w64, d)))
  train = output.metrics['client_work']['train']
  np.testing.assert_allclose(train['loss'], ref.loss(w64, d), rtol=1e-5)
  np.testing.assert_allclose(train['personalized_loss'],
                             ref.loss(w_tilde, d_prime), rtol=1e-5)


def test_hf_approaches_maml_quadratically_in_delta():
  rng = np.random.default_rng(5)
  x, y = h.random_client(rng, 3 * 16)
  w0 = tuple(3 * a for a in h.random_weights(rng))   # curved region
  ds = h.dataset(x, y, 16)
  model_fn = linear.softmax_regression_model_fn(DIM, CLASSES)
  kwargs = dict(alpha=1.0, beta=1.0, local_steps=1)
  _, maml = _run_one_round(
      perfed_tff.build_per_fedavg(model_fn, variant='maml', **kwargs), w0, [ds])
  # One HF process; delta is a hyperparameter in its state.
  hf_process = perfed_tff.build_per_fedavg(model_fn, variant='hf', delta=0.8,
                                           **kwargs)
  errors = []
  for delta in (0.8, 0.4, 0.2):
    _, hf = _run_one_round(hf_process, w0, [ds], delta=delta)
    errors.append(max(np.abs(f - m).max() for f, m in zip(hf, maml)))
  ratios = [errors[i] / errors[i + 1] for i in range(2)]
  assert errors[-1] < errors[0]
  for r in ratios:   # O(delta^2): halving delta divides the error by ~4
    assert 3.0 < r < 5.0, (errors, ratios)


def test_functional_model_gives_the_same_weights():
  rng = np.random.default_rng(2)
  x, y = h.random_client(rng, 30)
  w0 = h.random_weights(rng)
  functional = tff.learning.models.functional_model_from_keras(
      linear.create_softmax_regression(DIM, CLASSES),
      loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=(tf.TensorSpec([None, DIM], tf.float32),
                  tf.TensorSpec([None], tf.int32)))
  process = perfed_tff.build_per_fedavg(
      functional, variant='hf', alpha=0.3, beta=0.2, delta=1e-2, local_steps=2)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
  _, got = _run_one_round(process, w0, [ds])
  want, _, _ = ref.client_update(
      tuple(a.astype(np.float64) for a in w0),
      ref.batches_of(x.astype(np.float64), y, 5), 'hf', 0.3, 0.2, 1e-2, 2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  # And TFF's FedAvg accepts the very same model object.
  fedavg = tff.learning.algorithms.build_weighted_fed_avg(
      functional, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1))
  assert (fedavg.next.type_signature.parameter[0].member.global_model_weights
          == process.next.type_signature.parameter[0].member.global_model_weights)


def _functional_softmax_regression():
  return tff.learning.models.functional_model_from_keras(
      linear.create_softmax_regression(DIM, CLASSES),
      loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=collections.OrderedDict(
          x=tf.TensorSpec([None, DIM], tf.float32),
          y=tf.TensorSpec([None], tf.int32)))


@pytest.mark.parametrize('kind', ['variable_model_fn', 'variable_model',
                                  'functional'])
def test_sgd_steps_match_numpy_and_stop_when_batches_run_out(kind):
  rng = np.random.default_rng(4)
  x, y = h.random_client(rng, 3 * 5 + 2)   # 4 batches, the last one short
  w0 = h.random_weights(rng)
  model_fn = linear.softmax_regression_model_fn(DIM, CLASSES)
  functional = _functional_softmax_regression()   # built outside a graph
  make = {'variable_model_fn': lambda: model_fn,
          'variable_model': model_fn,
          'functional': lambda: functional}[kind]
  kinds = []

  # In a TFF computation, where a Keras FunctionalModel is usable.
  @tff.tensorflow.computation
  def adapt():
    oracle = model_oracles.oracle_for(make())
    kinds.append(type(oracle))
    run = tf.function(model_oracles.sgd_steps, autograph=False)
    return run(oracle, tuple(tf.constant(a) for a in w0), h.dataset(x, y, 5),
               0.3, 6)

  got, steps, examples = adapt()
  assert kinds == [model_oracles.FunctionalOracle if kind == 'functional'
                   else model_oracles.VariableOracle]
  want = tuple(a.astype(np.float64) for a in w0)
  for batch in ref.batches_of(x.astype(np.float64), y, 5):
    want = tuple(w - 0.3 * g for w, g in zip(want, ref.grad(want, batch)))
  assert (int(steps), int(examples)) == (4, 17)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_oracle_for_tracks_metrics_of_a_variable_model_fn_only():
  model_fn = linear.softmax_regression_model_fn(DIM, CLASSES)
  keys = ('model', 'personalized_model')
  assert model_oracles.oracle_for(model_fn, metrics_keys=keys).tracks_metrics
  assert not model_oracles.oracle_for(model_fn).tracks_metrics
  with pytest.raises(ValueError, match='callable'):
    model_oracles.oracle_for(model_fn(), metrics_keys=keys)
  functional = model_oracles.oracle_for(_functional_softmax_regression(),
                                        metrics_keys=keys)
  assert list(functional.initial_metrics_state()) == list(keys)
