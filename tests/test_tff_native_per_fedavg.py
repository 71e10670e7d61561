"""TFF-native Per-FedAvg: optimizers, hyperparameters in the state, model
metrics, aggregator semantics and multi-step adaptation, each against an
independent numpy computation (tests/numpy_reference.py) or against TFF."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import algorithms
from perfed_tff import per_fedavg
from perfed_tff import per_fedavg_client_work as client_work
from perfed_tff.models import linear
from tests import numpy_reference as ref

DIM, CLASSES = 6, 4
MODEL_FN = linear.softmax_regression_model_fn(DIM, CLASSES)

# Weights after one round of the code before this change (two clients, tau=2,
# alpha=0.3, beta=0.2, delta=1e-2), float32 bytes in hex: nu = 1 and the
# default optimizers must reproduce them bit for bit.
BEFORE = {'fo': ['a08392beeb7e313eb45fef3e915fcd3e903541be0c81053f2480f73e2a71d0be1914043f5cf3de3cce2405bf16f915bf7a9abe3e7c4dd4be1c2582bec4ecb03ca29db1bdd81502bf2a93d0be928a06bfc900c7bec255303fa2fff4bdb48e07bf', '2cde9f3d2e4e65bc827c02bd4eec03bd'], 'fo_loss': 'd6ade83f', 'hf': ['ec64a4be4deb813ecc5ef23eef15b33ec13c4fbea4fcf63ec25b043f819fc6be1733113f58fdec3c612b14bfd08114bfd6a7c93e5fedd3be749a8cbec26aa13c719cfcbd24bcdebe020edcbe12250abf14f3f3beca5c283f5a49f1bdbc26d3be', 'd0bc4d3af0d1b13c0ef3c93cc01941bd'], 'hf_loss': 'c21dec3f', 'maml': ['e864a4be4aeb813eca5ef23eee15b33ec23c4fbea6fcf63ec25b043f7f9fc6be1833113f74fdec3c622b14bfd28114bfd4a7c93e62edd3be739a8cbed46aa13c729cfcbd24bcdebe060edcbe10250abf14f3f3becb5c283f6049f1bdbd26d3be', 'e0c44d3a52d2b13cf4f2c93cb61941bd'], 'maml_loss': 'c31dec3f'}


def _client(seed, n=37):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, DIM)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  return x, y


def _dataset(x, y, batch_size):
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x, y=y)).batch(batch_size)


def _batches(x, y, batch_size):
  return ref.batches_of(x.astype(np.float64), y, batch_size)


def _weights(process, state):
  return [np.asarray(t) for t in process.get_model_weights(state).trainable]


def _with_weights(process, state, w):
  weights = process.get_model_weights(state)
  return process.set_model_weights(state, tff.learning.models.ModelWeights(
      trainable=type(weights.trainable)(w),
      non_trainable=weights.non_trainable))


def _random_weights(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(scale=0.5, size=(DIM, CLASSES)).astype(np.float32),
          rng.normal(scale=0.5, size=(CLASSES,)).astype(np.float32))


def _f64(w):
  return tuple(np.asarray(a, np.float64) for a in w)


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
def test_defaults_and_nu_1_reproduce_the_weights_before_the_change(variant):
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant=variant, alpha=0.3, beta=0.2, delta=1e-2,
      local_steps=2, inner_steps=1)
  out = process.next(process.initialize(),
                     [_dataset(*_client(0), 5), _dataset(*_client(1), 5)])
  got = [a.astype(np.float32).tobytes().hex()
         for a in _weights(process, out.state)]
  assert got == BEFORE[variant]


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
@pytest.mark.parametrize('inner_steps', [2, 3])
def test_nu_step_meta_gradient_matches_numpy(variant, inner_steps):
  x, y = _client(4, 70)
  w0 = _random_weights(1)
  alpha, beta, delta, tau, bs = 0.3, 0.2, 1e-2, 2, 5
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant=variant, alpha=alpha, beta=beta, delta=delta,
      local_steps=tau, inner_steps=inner_steps)
  state = _with_weights(process, process.initialize(), w0)
  out = process.next(state, [_dataset(x, y, bs)])
  want, steps, examples = ref.client_update_general(
      _f64(w0), _batches(x, y, bs), variant, alpha, delta, tau,
      inner_steps=inner_steps, beta=beta)
  assert steps == tau
  got = _weights(process, out.state)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  # Not vacuous: nu steps differ from the paper's single step.
  one, _, _ = ref.client_update_general(
      _f64(w0), _batches(x, y, bs), variant, alpha, delta, tau, beta=beta)
  assert max(np.abs(a - b).max() for a, b in zip(want, one)) > 1e-3
  train = out.metrics['client_work']['train']
  assert train['num_steps'] == tau and train['num_examples'] == examples
  assert algorithms.batches_per_round(
      f'per_fedavg_{variant}', tau, inner_steps=inner_steps) == (
          tau * ref.batches_per_step(variant, inner_steps))


def test_hf_approaches_maml_quadratically_in_delta_at_nu_2():
  x, y = _client(5, 5 * 16)
  w0 = tuple(3 * a for a in _random_weights(2))   # curved region
  ds = _dataset(x, y, 16)
  kwargs = dict(alpha=1.0, beta=1.0, local_steps=1, inner_steps=2)

  def run(**extra):
    process = perfed_tff.build_per_fedavg(MODEL_FN, **kwargs, **extra)
    state = _with_weights(process, process.initialize(), w0)
    return _weights(process, process.next(state, [ds]).state)

  maml = run(variant='maml')
  errors = []
  for delta in (0.8, 0.4, 0.2):
    hf = run(variant='hf', delta=delta)
    errors.append(max(np.abs(h - m).max() for h, m in zip(hf, maml)))
  ratios = [errors[i] / errors[i + 1] for i in range(2)]
  for r in ratios:   # O(delta^2): halving delta divides the error by ~4
    assert 3.0 < r < 5.0, (errors, ratios)


def test_server_momentum_over_two_rounds_matches_numpy():
  clients = [_client(10, 24), _client(11, 30)]
  w0 = _random_weights(3)
  alpha, beta, tau, bs = 0.2, 0.3, 2, 4
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='fo', alpha=alpha, beta=beta, local_steps=tau,
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(
          1.0, momentum=0.9))
  state = _with_weights(process, process.initialize(), w0)
  server = ref.SGDM(1.0, momentum=0.9)
  w = _f64(w0)
  for round_num in range(2):
    # Round 2 sees other batches of the same clients.
    data = [(cx[round_num::2], cy[round_num::2]) for cx, cy in clients]
    state = process.next(state, [_dataset(cx, cy, bs) for cx, cy in data]
                         ).state
    models = [ref.client_update_general(w, _batches(cx, cy, bs), 'fo', alpha,
                                        0.0, tau, beta=beta)[0]
              for cx, cy in data]
    update = tuple(np.mean([wi - mi[i] for mi in models], axis=0)
                   for i, wi in enumerate(w))
    w = server.step(w, update)
  for g, want in zip(_weights(process, state), w):
    np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
  hparams = process.get_hparams(state)
  assert hparams['finalizer']['momentum'] == pytest.approx(0.9)


@pytest.mark.parametrize('variant', ['hf', 'maml'])
def test_adam_client_optimizer_over_one_round_matches_numpy(variant):
  x, y = _client(12, 40)
  w0 = _random_weights(4)
  alpha, delta, tau, bs = 0.3, 1e-2, 3, 4
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant=variant, alpha=alpha, delta=delta, local_steps=tau,
      client_optimizer_fn=lambda: tff.learning.optimizers.build_adam(0.05))
  state = _with_weights(process, process.initialize(), w0)
  out = process.next(state, [_dataset(x, y, bs)])
  want, steps, _ = ref.client_update_general(
      _f64(w0), _batches(x, y, bs), variant, alpha, delta, tau,
      optimizer=ref.Adam(0.05))
  assert steps == tau
  for g, w in zip(_weights(process, out.state), want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  assert process.get_hparams(out.state)['client_work']['client_optimizer'][
      'learning_rate'] == pytest.approx(0.05)


class _CompileCounter:
  """Counts TFF compilations in the installed execution context."""

  def __init__(self, context):
    self._pipeline = context.context._async_context._compiler_pipeline  # pylint: disable=protected-access
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


def test_set_hparams_changes_alpha_without_rebuild_or_retrace(
    monkeypatch, tff_context):
  traces = collections.Counter()
  step = client_work.per_fedavg_local_step

  def counting_step(*args, **kwargs):
    traces['local_step'] += 1
    return step(*args, **kwargs)

  monkeypatch.setattr(client_work, 'per_fedavg_local_step', counting_step)
  x, y = _client(13, 30)
  data = [_dataset(x, y, 5)]
  kwargs = dict(variant='hf', beta=0.2, delta=1e-2, local_steps=2)
  process = perfed_tff.build_per_fedavg(MODEL_FN, alpha=0.3, **kwargs)
  state = process.initialize()
  process.next(state, data)                      # compiles `next`
  hparams = process.get_hparams(state)
  state = process.set_hparams(state, hparams)    # compiles set_hparams
  after_build = traces['local_step']
  hparams['client_work']['alpha'] = np.float32(0.1)
  hparams['client_work']['client_optimizer']['learning_rate'] = np.float32(
      0.05)
  with _CompileCounter(tff_context) as compiles:
    changed = process.set_hparams(state, hparams)
    got = _weights(process, process.next(changed, data).state)
    assert compiles.count == 0
  assert traces['local_step'] == after_build
  assert process.get_hparams(changed)['client_work']['alpha'] == (
      pytest.approx(0.1))

  rebuilt = perfed_tff.build_per_fedavg(
      MODEL_FN, alpha=0.1, **dict(kwargs, beta=0.05))
  want = _weights(rebuilt, rebuilt.next(rebuilt.initialize(), data).state)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  unchanged = _weights(process, process.next(state, data).state)
  assert max(np.abs(a - b).max() for a, b in zip(got, unchanged)) > 1e-4


@pytest.mark.parametrize('factory', [
    tff.aggregators.SumFactory(),
    tff.aggregators.SecureSumFactory(100.0, -100.0),
    tff.aggregators.clipping_factory(1.0, tff.aggregators.SumFactory()),
    tff.aggregators.EncodedSumFactory.quantize_above_threshold(8),
], ids=['sum', 'secure_sum', 'clipped_sum', 'encoded_sum'])
def test_sum_factories_raise_type_error(factory):
  with pytest.raises(TypeError, match='sums the client updates'):
    perfed_tff.build_per_fedavg(MODEL_FN, variant='fo', alpha=0.1, beta=0.1,
                                local_steps=1, model_aggregator=factory)
  with pytest.raises(TypeError, match='sums the client updates'):
    algorithms.build_algorithm('fedavg', MODEL_FN, alpha=0.1, beta=0.1,
                               local_steps=1, model_aggregator=factory)


def test_mean_like_factories_are_recognised():
  for factory in [
      tff.aggregators.UnweightedMeanFactory(),
      tff.learning.robust_aggregator(weighted=False),
      tff.learning.compression_aggregator(weighted=False),
      tff.learning.dp_aggregator(noise_multiplier=0.0, clients_per_round=2),
      tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
          noise_multiplier=0.0, clients_per_round=2, l2_norm_clip=1.0,
          record_specs=tf.TensorSpec([2])),
  ]:
    assert per_fedavg.aggregation_semantics(factory) == 'mean', factory


@pytest.mark.parametrize('name', ['mean', 'dp_fixed', 'dp', 'robust',
                                  'compression'])
def test_mean_dp_robust_and_compression_aggregators_compose(name):
  factory = {
      'mean': tff.aggregators.MeanFactory(),
      'dp_fixed': tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
          noise_multiplier=0.0, clients_per_round=2, clip=100.0),
      'dp': tff.learning.dp_aggregator(noise_multiplier=0.0,
                                       clients_per_round=2),
      'robust': tff.learning.robust_aggregator(),
      'compression': tff.learning.compression_aggregator(),
  }[name]
  clients = [_client(20, 16), _client(21, 16)]
  w0 = _random_weights(5)
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='fo', alpha=0.1, beta=0.1, local_steps=1,
      model_aggregator=factory)
  state = _with_weights(process, process.initialize(), w0)
  out = process.next(state, [_dataset(cx, cy, 4) for cx, cy in clients])
  got = _weights(process, out.state)
  models = [ref.client_update_general(_f64(w0), _batches(cx, cy, 4), 'fo',
                                      0.1, 0.0, 1, beta=0.1)[0]
            for cx, cy in clients]
  mean = [(a + b) / 2 for a, b in zip(*models)]
  if name in ('mean', 'dp_fixed'):   # no clipping, no noise: the mean
    for g, w in zip(got, mean):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
  else:   # adaptive clipping / quantization: the mean's direction, not a sum
    step = np.concatenate([(g - w).ravel() for g, w in zip(got, w0)])
    want = np.concatenate([(m - w).ravel() for m, w in zip(mean, w0)])
    assert np.all(np.isfinite(step))
    cosine = step @ want / np.linalg.norm(step) / np.linalg.norm(want)
    assert cosine > 0.9, cosine
    assert np.linalg.norm(step) <= 1.05 * np.linalg.norm(want)


def _accuracy(w, batch):
  x, y = batch
  return np.argmax(x @ w[0] + w[1], axis=1) == y


@pytest.mark.parametrize('functional', [False, True])
def test_model_metrics_at_w_on_d_and_at_w_tilde_on_d_prime(functional):
  x, y = _client(30, 24)
  w0 = _random_weights(6)
  alpha, bs = 0.5, 4
  if functional:
    model = tff.learning.models.functional_model_from_keras(
        linear.create_softmax_regression(DIM, CLASSES),
        loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True),
        input_spec=linear.element_spec(DIM),
        metrics_constructor=collections.OrderedDict(
            sparse_categorical_accuracy=(
                tf.keras.metrics.SparseCategoricalAccuracy)))
  else:
    model = MODEL_FN
  process = perfed_tff.build_per_fedavg(
      model, variant='maml', alpha=alpha, beta=0.4, local_steps=2)
  state = _with_weights(process, process.initialize(), w0)
  train = process.next(state, [_dataset(x, y, bs)]).metrics[
      'client_work']['train']
  batches = _batches(x, y, bs)
  w, correct, correct_p = _f64(w0), [], []
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
  w1 = ref.local_step(_f64(w0), batches[:3], 'maml', alpha, 0.4, 0.0)
  np.testing.assert_allclose(
      train['loss'],
      np.mean([ref.loss(_f64(w0), batches[0]), ref.loss(w1, batches[3])]),
      rtol=1e-5)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(inner_steps=0), ValueError, ''),
    (dict(beta=None), ValueError, ''),
    (dict(client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1)),
     ValueError, ''),
    (dict(beta=None, client_optimizer_fn=lambda: tf.keras.optimizers.SGD(0.1)),
     TypeError, 'client_optimizer_fn'),
    (dict(server_optimizer_fn='sgd'), TypeError, 'server_optimizer_fn'),
    (dict(model_distributor=object()), TypeError, 'model_distributor'),
])
def test_bad_arguments(kwargs, error, match):
  args = dict(variant='hf', alpha=0.1, beta=0.1, local_steps=1)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    perfed_tff.build_per_fedavg(MODEL_FN, **args)


def test_secure_sum_then_finalize_as_metrics_aggregator(tff_context):
  """It builds (the (sum, count) pairs are lists, not tuples) and gives the
  same metrics as the default. TFF 0.87's native runtime does not execute
  secure intrinsics, so this runs them as TFF's test backend does (secure
  sums replaced by plain sums) on the session's own worker."""
  from tensorflow_federated.python.core.backends.test import compiler as test_compiler  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context  # pylint: disable=g-import-not-at-top
  from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
  kwargs = execution._context_kwargs('tff', True)  # pylint: disable=protected-access
  compile_native = kwargs['compiler_fn']
  kwargs['compiler_fn'] = lambda comp: compile_native(
      test_compiler.replace_secure_intrinsics_with_bodies(comp))
  context = sync_execution_context.SyncExecutionContext(
      execution._executor_factory(tff_context.addresses[0], 0, 60.0, 30.0),  # pylint: disable=protected-access
      **kwargs)
  data = [_dataset(*_client(40, 20), 4), _dataset(*_client(41, 12), 4)]
  metrics = {}
  for name, aggregator in (
      ('secure', tff.learning.metrics.secure_sum_then_finalize),
      ('plain', None)):
    process = perfed_tff.build_per_fedavg(
        MODEL_FN, variant='hf', alpha=0.2, beta=0.2, local_steps=2,
        metrics_aggregator=aggregator)
    with tff.framework.get_context_stack().install(context):
      metrics[name] = process.next(process.initialize(), data).metrics[
          'client_work']['train']
  assert 'secure_sum_measurements' in metrics['secure']
  for key, value in metrics['plain'].items():
    np.testing.assert_allclose(metrics['secure'][key], value, rtol=1e-5,
                               err_msg=key)
