"""Per-FedAvg's client work through TFF's API: nu-step meta-gradients, the
client optimizer and the model metrics at w on D and at w~ on D', each
against an independent numpy computation (tests/numpy_reference.py)."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import algorithms
from perfed_tff.models import linear
from tests import numpy_reference as ref
from tests import tff_helpers as h


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
@pytest.mark.parametrize('inner_steps', [2, 3])
def test_nu_step_meta_gradient_matches_numpy(variant, inner_steps):
  x, y = h.random_client(4, 70)
  w0 = h.random_weights(1)
  alpha, beta, delta, tau, bs = 0.3, 0.2, 1e-2, 2, 5
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant=variant, alpha=alpha, beta=beta, delta=delta,
      local_steps=tau, inner_steps=inner_steps)
  state = h.with_trainable(process, process.initialize(), w0)
  out = process.next(state, [h.dataset(x, y, bs)])
  want, steps, examples = ref.client_update_general(
      h.f64(w0), h.ref_batches(x, y, bs), variant, alpha, delta, tau,
      inner_steps=inner_steps, beta=beta)
  assert steps == tau
  got = h.trainable(process, out.state)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  # Not vacuous: nu steps differ from the paper's single step.
  one, _, _ = ref.client_update_general(
      h.f64(w0), h.ref_batches(x, y, bs), variant, alpha, delta, tau, beta=beta)
  assert max(np.abs(a - b).max() for a, b in zip(want, one)) > 1e-3
  train = out.metrics['client_work']['train']
  assert train['num_steps'] == tau and train['num_examples'] == examples
  assert algorithms.batches_per_round(
      f'per_fedavg_{variant}', tau, inner_steps=inner_steps) == (
          tau * ref.batches_per_step(variant, inner_steps))


def test_hf_approaches_maml_quadratically_in_delta_at_nu_2():
  x, y = h.random_client(5, 5 * 16)
  w0 = tuple(3 * a for a in h.random_weights(2))   # curved region
  ds = h.dataset(x, y, 16)
  kwargs = dict(alpha=1.0, beta=1.0, local_steps=1, inner_steps=2)

  def run(process, delta=None):
    state = process.initialize()
    if delta is not None:
      state = h.with_delta(process, state, delta)
    state = h.with_trainable(process, state, w0)
    return h.trainable(process, process.next(state, [ds]).state)

  maml = run(perfed_tff.build_per_fedavg(h.MODEL_FN, variant='maml', **kwargs))
  hf_process = perfed_tff.build_per_fedavg(h.MODEL_FN, variant='hf', **kwargs)
  errors = []
  for delta in (0.8, 0.4, 0.2):
    hf = run(hf_process, delta)
    errors.append(max(np.abs(f - m).max() for f, m in zip(hf, maml)))
  ratios = [errors[i] / errors[i + 1] for i in range(2)]
  for r in ratios:   # O(delta^2): halving delta divides the error by ~4
    assert 3.0 < r < 5.0, (errors, ratios)


@pytest.mark.parametrize('variant', ['hf', 'maml'])
def test_adam_client_optimizer_over_one_round_matches_numpy(variant):
  x, y = h.random_client(12, 40)
  w0 = h.random_weights(4)
  alpha, delta, tau, bs = 0.3, 1e-2, 3, 4
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant=variant, alpha=alpha, delta=delta, local_steps=tau,
      client_optimizer_fn=lambda: tff.learning.optimizers.build_adam(0.05))
  state = h.with_trainable(process, process.initialize(), w0)
  out = process.next(state, [h.dataset(x, y, bs)])
  want, steps, _ = ref.client_update_general(
      h.f64(w0), h.ref_batches(x, y, bs), variant, alpha, delta, tau,
      optimizer=ref.Adam(0.05))
  assert steps == tau
  for g, w in zip(h.trainable(process, out.state), want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  assert process.get_hparams(out.state)['client_work']['client_optimizer'][
      'learning_rate'] == pytest.approx(0.05)


def _accuracy(w, batch):
  x, y = batch
  return np.argmax(x @ w[0] + w[1], axis=1) == y


@pytest.mark.parametrize('functional', [False, True])
def test_model_metrics_at_w_on_d_and_at_w_tilde_on_d_prime(functional):
  x, y = h.random_client(30, 24)
  w0 = h.random_weights(6)
  alpha, bs = 0.5, 4
  if functional:
    model = tff.learning.models.functional_model_from_keras(
        linear.create_softmax_regression(h.DIM, h.CLASSES),
        loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True),
        input_spec=linear.element_spec(h.DIM),
        metrics_constructor=collections.OrderedDict(
            sparse_categorical_accuracy=(
                tf.keras.metrics.SparseCategoricalAccuracy)))
  else:
    model = h.MODEL_FN
  process = perfed_tff.build_per_fedavg(
      model, variant='maml', alpha=alpha, beta=0.4, local_steps=2)
  state = h.with_trainable(process, process.initialize(), w0)
  train = process.next(state, [h.dataset(x, y, bs)]).metrics[
      'client_work']['train']
  batches = h.ref_batches(x, y, bs)
  w, correct, correct_p = h.f64(w0), [], []
  for t in range(2):
    d, d_prime = batches[3 * t], batches[3 * t + 1]
    w_tilde = tuple(a - alpha * g for a, g in zip(w, ref.grad(w, d)))
    correct.append(_accuracy(w, d))
    correct_p.append(_accuracy(w_tilde, d_prime))
    w = ref.local_step(w, batches[3 * t:3 * t + 3], 'maml', alpha, 0.4, 0.0)
  np.testing.assert_allclose(train['sparse_categorical_accuracy'],
                             np.concatenate(correct).mean(), atol=1e-6)
  np.testing.assert_allclose(
      train['personalized_sparse_categorical_accuracy'],
      np.concatenate(correct_p).mean(), atol=1e-6)
  assert train['num_steps'] == 2 and train['num_examples'] == 24
  w1 = ref.local_step(h.f64(w0), batches[:3], 'maml', alpha, 0.4, 0.0)
  np.testing.assert_allclose(
      train['loss'],
      np.mean([ref.loss(h.f64(w0), batches[0]), ref.loss(w1, batches[3])]),
      rtol=1e-5)

