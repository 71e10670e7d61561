"""`build_per_fedavg`: the LearningProcess shape, server averaging and
optimizers, hyperparameters in the state, aggregator semantics, metrics
aggregators, faults and argument checks."""

import collections
import gc

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff import process_arguments
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib
from perfed_tff.models import linear
from tests import numpy_reference as ref
from tests import tff_helpers as h

DIM, CLASSES = 5, 3
MODEL_FN = linear.softmax_regression_model_fn(DIM, CLASSES)


def _clients(rng, sizes):
  return [h.random_client(rng, n, DIM, CLASSES) for n in sizes]


def test_is_a_learning_process_with_the_learning_process_signature():
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='hf', alpha=0.1, beta=0.1, local_steps=2)
  assert isinstance(process, tff.learning.templates.LearningProcess)
  assert isinstance(process, tff.templates.IterativeProcess)
  state_type = process.initialize.type_signature.result
  param = process.next.type_signature.parameter
  assert param[0] == state_type and state_type.placement is tff.SERVER
  assert param[1].placement is tff.CLIENTS
  assert param[1].member == tff.SequenceType(collections.OrderedDict(
      x=tff.TensorType(np.float32, [None, DIM]),
      y=tff.TensorType(np.int32, [None])))
  result = process.next.type_signature.result
  assert result.state == state_type
  assert result.metrics.placement is tff.SERVER
  train_type = result.metrics.member.client_work.train
  assert {name for name, _ in tff.structure.iter_elements(train_type)} >= {
      'loss', 'personalized_loss', 'num_examples', 'num_steps'}
  # The model weights have exactly TFF FedAvg's type, so the two swap.
  fedavg = algorithms.build_algorithm('fedavg', MODEL_FN, alpha=0.1, beta=0.1,
                                      local_steps=2)
  assert (process.get_model_weights.type_signature.result ==
          fedavg.get_model_weights.type_signature.result)


def test_state_round_trips_through_get_and_set_model_weights():
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='fo', alpha=0.1, beta=0.1, local_steps=1)
  state = process.initialize()
  rng = np.random.default_rng(0)
  new = tff.learning.models.ModelWeights(
      trainable=[rng.normal(size=(DIM, CLASSES)).astype(np.float32),
                 rng.normal(size=(CLASSES,)).astype(np.float32)],
      non_trainable=[])
  state = process.set_model_weights(state, new)
  got = process.get_model_weights(state)
  for g, w in zip(got.trainable, new.trainable):
    np.testing.assert_array_equal(g, w)
  # Weights taken from FedAvg's state go into Per-FedAvg's and back.
  fedavg = algorithms.build_algorithm('fedavg', MODEL_FN, alpha=0.1, beta=0.1,
                                      local_steps=1)
  fed_state = fedavg.set_model_weights(fedavg.initialize(), got)
  for g, w in zip(fedavg.get_model_weights(fed_state).trainable, new.trainable):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize('weighting', ['uniform', 'num_examples'])
def test_server_average_matches_numpy(weighting):
  rng = np.random.default_rng(1)
  sizes = [12, 30, 5, 21]   # the 5-example client completes no full HF step
  data = _clients(rng, sizes)
  alpha, beta, delta, tau, bs = 0.2, 0.3, 1e-2, 2, 3
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='hf', alpha=alpha, beta=beta, delta=delta,
      local_steps=tau, client_weighting=weighting)
  state = process.initialize()
  w0 = tuple(np.asarray(t, np.float64)
             for t in process.get_model_weights(state).trainable)
  out = process.next(state, [h.dataset(x, y, bs) for x, y in data])
  got = process.get_model_weights(out.state).trainable

  models, weights = [], []
  for x, y in data:
    w, steps, examples = ref.client_update(
        w0, ref.batches_of(x.astype(np.float64), y, bs), 'hf', alpha, beta,
        delta, tau)
    models.append(w)
    weights.append(0.0 if steps == 0 else
                   (1.0 if weighting == 'uniform' else float(examples)))
  assert weights[2] == 0.0
  p = np.array(weights) / np.sum(weights)
  for i, g in enumerate(got):
    want = sum(p_k * m[i] for p_k, m in zip(p, models))
    np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
  assert out.metrics['client_work']['train']['num_clients_without_step'] == 1


def test_empty_client_does_not_break_the_round():
  rng = np.random.default_rng(2)
  (x, y), = _clients(rng, [24])
  empty = h.dataset(x[:0], y[:0], 4)
  for variant in ['fo', 'hf', 'maml']:
    process = perfed_tff.build_per_fedavg(
        MODEL_FN, variant=variant, alpha=0.1, beta=0.1, local_steps=2)
    state = process.initialize()
    alone = process.next(state, [h.dataset(x, y, 4)])
    with_empty = process.next(state, [h.dataset(x, y, 4), empty])
    for a, b in zip(process.get_model_weights(alone.state).trainable,
                    process.get_model_weights(with_empty.state).trainable):
      assert np.all(np.isfinite(b))
      np.testing.assert_allclose(a, b, atol=1e-6)
    assert with_empty.metrics['client_work']['train'][
        'num_clients_without_step'] == 1
    # Only empty clients: nothing to average, the model stays as it was.
    only_empty = process.next(state, [empty, empty])
    for a, b in zip(process.get_model_weights(state).trainable,
                    process.get_model_weights(only_empty.state).trainable):
      np.testing.assert_array_equal(a, b)


def test_non_finite_client_is_rejected_and_counted():
  rng = np.random.default_rng(3)
  (x, y), = _clients(rng, [24])
  bad_x = np.full_like(x, np.nan)
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='hf', alpha=0.1, beta=0.1, local_steps=2)
  state = process.initialize()
  good = process.next(state, [h.dataset(x, y, 4)])
  mixed = process.next(state, [h.dataset(x, y, 4), h.dataset(bad_x, y, 4)])
  for a, b in zip(process.get_model_weights(good.state).trainable,
                  process.get_model_weights(mixed.state).trainable):
    np.testing.assert_allclose(a, b, atol=1e-6)
  train = mixed.metrics['client_work']['train']
  assert train['num_non_finite_updates'] == 1
  assert np.isfinite(train['loss'])


def test_round_without_a_usable_client_reports_nan_losses():
  """Every client non-finite, or no clients: the losses are NaN (nothing was
  measured), not the 0.0 of an empty weighted mean; a normal round's are
  finite."""
  rng = np.random.default_rng(4)
  (x, y), = _clients(rng, [24])
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='hf', alpha=0.1, beta=0.1, local_steps=2)
  state = process.initialize()
  good = process.next(state, [h.dataset(x, y, 4)]).metrics
  assert np.isfinite(good['client_work']['train']['loss'])
  assert np.isfinite(good['client_work']['train']['personalized_loss'])
  bad = h.dataset(np.full_like(x, np.nan), y, 4)
  for data, count in (([bad, bad], 'num_non_finite_updates'), ([], None)):
    train = process.next(state, data).metrics['client_work']['train']
    assert np.isnan(train['loss']) and np.isnan(train['personalized_loss'])
    if count:
      assert train[count] == 2
    assert train['num_steps'] == 0


def test_unweighted_aggregator_composes():
  """A DP (unweighted) tff.aggregators factory plugs in as model_aggregator."""
  dp = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
      noise_multiplier=0.0, clients_per_round=2, clip=100.0)
  process = perfed_tff.build_per_fedavg(
      MODEL_FN, variant='fo', alpha=0.1, beta=0.1, local_steps=1,
      model_aggregator=dp)
  rng = np.random.default_rng(4)
  data = _clients(rng, [8, 8])
  state = process.initialize()
  w0 = tuple(np.asarray(t, np.float64)
             for t in process.get_model_weights(state).trainable)
  out = process.next(state, [h.dataset(x, y, 4) for x, y in data])
  models = [ref.client_update(w0, ref.batches_of(x.astype(np.float64), y, 4),
                              'fo', 0.1, 0.1, 1e-3, 1)[0] for x, y in data]
  for i, g in enumerate(process.get_model_weights(out.state).trainable):
    np.testing.assert_allclose(g, (models[0][i] + models[1][i]) / 2, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
def test_a_few_rounds_on_synthetic_lower_the_training_loss(variant):
  task = synthetic.load_synthetic(1.0, 1.0, num_users=20, seed=0)
  process = perfed_tff.build_per_fedavg(
      task.model_fn, variant=variant, alpha=0.05, beta=0.05, local_steps=5)
  state = process.initialize()

  def round_data(r):
    ids = task_lib.sample_clients(task.client_ids, 10, seed=0, round_num=r)
    return [task_lib.client_batches(
        task.train.create_tf_dataset_for_client(c), batch_size=16,
        num_batches=3 * 5, seed=task_lib.derive_seed(0, r, c)) for c in ids]

  def population_loss(state):
    weights = process.get_model_weights(state).trainable
    losses = []
    for c in task.client_ids:
      ds = task.train.create_tf_dataset_for_client(c)
      x = np.stack([e['x'] for e in ds.as_numpy_iterator()]).astype(np.float64)
      y = np.array([e['y'] for e in ds.as_numpy_iterator()])
      losses.append(ref.loss(tuple(np.asarray(w, np.float64) for w in weights),
                             (x, y)))
    return np.mean(losses)

  before = population_loss(state)
  for r in range(10):
    state = process.next(state, round_data(r)).state
  after = population_loss(state)
  assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize('kwargs, name', [
    (dict(variant='sgd'), 'variant'),
    (dict(alpha=0.0), 'alpha'),
    (dict(alpha=-1.0), 'alpha'),
    (dict(beta=0.0), 'beta'),
    (dict(delta=0.0), 'delta'),
    (dict(delta=float('nan')), 'delta'),
    (dict(local_steps=0), 'local_steps'),
    (dict(local_steps=1.5), 'local_steps'),
    (dict(client_weighting='by_size'), 'client_weighting'),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
  args = dict(variant='hf', alpha=0.1, beta=0.1, delta=1e-3, local_steps=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=f'`{name}`'):
    perfed_tff.build_per_fedavg(MODEL_FN, **args)


def test_model_fn_must_be_callable_or_functional():
  with pytest.raises(TypeError, match='model_fn'):
    perfed_tff.build_per_fedavg(42, variant='fo', alpha=0.1, beta=0.1,
                                local_steps=1)


# ---- Optimizers, hyperparameters, aggregators, metrics aggregators ----
#
# Against the numpy reference, on tff_helpers' 6-input, 4-class softmax
# regression (h.MODEL_FN; the bytes in BEFORE are of that model).

# Weights after one round of the code before this change (two clients, tau=2,
# alpha=0.3, beta=0.2, delta=1e-2), float32 bytes in hex, recorded on one
# machine: nu = 1 and the default optimizers must reproduce them. TF's CPU
# kernels pick code paths by the processor's instruction set, so another
# machine can differ in the last bits: the weights are compared with a
# tolerance far below any change of the math (a changed step moves them by
# 1e-3 or more).
BEFORE = {'fo': ['a08392beeb7e313eb45fef3e915fcd3e903541be0c81053f2480f73e2a71d0be1914043f5cf3de3cce2405bf16f915bf7a9abe3e7c4dd4be1c2582bec4ecb03ca29db1bdd81502bf2a93d0be928a06bfc900c7bec255303fa2fff4bdb48e07bf', '2cde9f3d2e4e65bc827c02bd4eec03bd'], 'fo_loss': 'd6ade83f', 'hf': ['ec64a4be4deb813ecc5ef23eef15b33ec13c4fbea4fcf63ec25b043f819fc6be1733113f58fdec3c612b14bfd08114bfd6a7c93e5fedd3be749a8cbec26aa13c719cfcbd24bcdebe020edcbe12250abf14f3f3beca5c283f5a49f1bdbc26d3be', 'd0bc4d3af0d1b13c0ef3c93cc01941bd'], 'hf_loss': 'c21dec3f', 'maml': ['e864a4be4aeb813eca5ef23eee15b33ec23c4fbea6fcf63ec25b043f7f9fc6be1833113f74fdec3c622b14bfd28114bfd4a7c93e62edd3be739a8cbed46aa13c729cfcbd24bcdebe060edcbe10250abf14f3f3becb5c283f6049f1bdbd26d3be', 'e0c44d3a52d2b13cf4f2c93cb61941bd'], 'maml_loss': 'c31dec3f'}


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
def test_defaults_and_nu_1_reproduce_the_weights_before_the_change(variant):
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant=variant, alpha=0.3, beta=0.2, delta=1e-2,
      local_steps=2, inner_steps=1)
  out = process.next(process.initialize(),
                     [h.dataset(*h.random_client(0, 37), 5),
                      h.dataset(*h.random_client(1, 37), 5)])
  for got, want in zip(h.trainable(process, out.state), BEFORE[variant]):
    want = np.frombuffer(bytes.fromhex(want), np.float32).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_server_momentum_over_two_rounds_matches_numpy():
  clients = [h.random_client(10, 24), h.random_client(11, 30)]
  w0 = h.random_weights(3)
  alpha, beta, tau, bs = 0.2, 0.3, 2, 4
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant='fo', alpha=alpha, beta=beta, local_steps=tau,
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(
          1.0, momentum=0.9))
  state = h.with_trainable(process, process.initialize(), w0)
  server = ref.SGDM(1.0, momentum=0.9)
  w = h.f64(w0)
  for round_num in range(2):
    # Round 2 sees other batches of the same clients.
    data = [(cx[round_num::2], cy[round_num::2]) for cx, cy in clients]
    state = process.next(state, [h.dataset(cx, cy, bs) for cx, cy in data]
                         ).state
    models = [ref.client_update_general(w, h.ref_batches(cx, cy, bs), 'fo',
                                        alpha, 0.0, tau, beta=beta)[0]
              for cx, cy in data]
    update = tuple(np.mean([wi - mi[i] for mi in models], axis=0)
                   for i, wi in enumerate(w))
    w = server.step(w, update)
  for g, want in zip(h.trainable(process, state), w):
    np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
  hparams = process.get_hparams(state)
  assert hparams['finalizer']['momentum'] == pytest.approx(0.9)


def test_set_hparams_changes_alpha_without_rebuild_or_retrace(
    local_step_traces):
  traces = local_step_traces
  x, y = h.random_client(13, 30)
  data = [h.dataset(x, y, 5)]
  kwargs = dict(variant='hf', beta=0.2, delta=1e-2, local_steps=2)
  process = perfed_tff.build_per_fedavg(h.MODEL_FN, alpha=0.3, **kwargs)
  state = process.initialize()
  process.next(state, data)                      # compiles `next`
  hparams = process.get_hparams(state)
  state = process.set_hparams(state, hparams)    # compiles set_hparams
  h.trainable(process, state)                    # compiles get_model_weights
  after_build = traces['local_step']
  hparams['client_work']['alpha'] = np.float32(0.1)
  hparams['client_work']['client_optimizer']['learning_rate'] = np.float32(
      0.05)
  with h.CompileCounter() as compiles:
    changed = process.set_hparams(state, hparams)
    got = h.trainable(process, process.next(changed, data).state)
    assert compiles.count == 0
  assert traces['local_step'] == after_build
  assert process.get_hparams(changed)['client_work']['alpha'] == (
      pytest.approx(0.1))

  rebuilt = perfed_tff.build_per_fedavg(
      h.MODEL_FN, alpha=0.1, **dict(kwargs, beta=0.05))
  want = h.trainable(rebuilt, rebuilt.next(rebuilt.initialize(), data).state)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  unchanged = h.trainable(process, process.next(state, data).state)
  assert max(np.abs(a - b).max() for a, b in zip(got, unchanged)) > 1e-4


@pytest.mark.parametrize('factory', [
    tff.aggregators.SumFactory(),
    tff.aggregators.SecureSumFactory(100.0, -100.0),
    tff.aggregators.EncodedSumFactory.quantize_above_threshold(8),
], ids=['sum', 'secure_sum', 'encoded_sum'])
def test_sum_factories_raise_type_error(factory):
  with pytest.raises(TypeError, match='sums the client updates'):
    perfed_tff.build_per_fedavg(h.MODEL_FN, variant='fo', alpha=0.1, beta=0.1,
                                local_steps=1, model_aggregator=factory)
  with pytest.raises(TypeError, match='sums the client updates'):
    algorithms.build_algorithm('fedavg', h.MODEL_FN, alpha=0.1, beta=0.1,
                               local_steps=1, model_aggregator=factory)


def test_mean_like_factories_are_accepted():
  """Every unweighted factory but TFF's sums is taken as a mean (a
  wrapper's inner sum cannot be told with TFF's public API)."""
  for factory in [
      tff.aggregators.UnweightedMeanFactory(),
      tff.learning.robust_aggregator(weighted=False),
      tff.learning.compression_aggregator(weighted=False),
      tff.learning.dp_aggregator(noise_multiplier=0.0, clients_per_round=2),
      tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
          noise_multiplier=0.0, clients_per_round=2, l2_norm_clip=1.0,
          record_specs=tf.TensorSpec([2])),
  ]:
    assert isinstance(process_arguments.check_model_aggregator(factory),
                      tff.aggregators.WeightedAggregationFactory), factory


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
  clients = [h.random_client(20, 16), h.random_client(21, 16)]
  w0 = h.random_weights(5)
  process = perfed_tff.build_per_fedavg(
      h.MODEL_FN, variant='fo', alpha=0.1, beta=0.1, local_steps=1,
      model_aggregator=factory)
  state = h.with_trainable(process, process.initialize(), w0)
  out = process.next(state, [h.dataset(cx, cy, 4) for cx, cy in clients])
  got = h.trainable(process, out.state)
  models = [ref.client_update_general(h.f64(w0), h.ref_batches(cx, cy, 4),
                                      'fo', 0.1, 0.0, 1, beta=0.1)[0]
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
    perfed_tff.build_per_fedavg(h.MODEL_FN, **args)


def test_secure_sum_then_finalize_as_metrics_aggregator():
  """It builds (the (sum, count) pairs are lists, not tuples) and gives the
  same metrics as the default. TFF 0.87's native runtime does not execute
  secure intrinsics, so this runs them as TFF's test backend does (secure
  sums replaced by plain sums) on a TFF C++ worker of its own."""
  from tensorflow_federated.python.core.backends.native import compiler as native_compiler  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.backends.test import compiler as test_compiler  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation  # pylint: disable=g-import-not-at-top
  context = tff.framework.SyncExecutionContext(
      tff.framework.local_cpp_executor_factory(),
      compiler_fn=lambda comp: native_compiler.desugar_and_transform_to_native(
          test_compiler.replace_secure_intrinsics_with_bodies(comp)),
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result)
  data = [h.dataset(*h.random_client(40, 20), 4),
          h.dataset(*h.random_client(41, 12), 4)]
  metrics = {}
  for name, aggregator in (
      ('secure', tff.learning.metrics.secure_sum_then_finalize),
      ('plain', None)):
    process = perfed_tff.build_per_fedavg(
        h.MODEL_FN, variant='hf', alpha=0.2, beta=0.2, local_steps=2,
        metrics_aggregator=aggregator)
    with tff.framework.get_context_stack().install(context):
      metrics[name] = process.next(process.initialize(), data).metrics[
          'client_work']['train']
  assert 'secure_sum_measurements' in metrics['secure']
  for key, value in metrics['plain'].items():
    np.testing.assert_allclose(metrics['secure'][key], value, rtol=1e-5,
                               err_msg=key)
  del context
  gc.collect()  # Its worker stops with it.


def test_the_client_optimizer_rule():
  """beta xor client_optimizer_fn: the one rule (`check_client_optimizer`)
  that `build_per_fedavg` and `algorithms.build_algorithm` (FedAvg too)
  apply; tests/test_algorithms.py checks that the builders agree."""
  spec = [tf.TensorSpec([2], tf.float32)]

  def learning_rate(optimizer):
    return float(optimizer.get_hparams(optimizer.initialize(spec))[
        'learning_rate'])

  assert learning_rate(process_arguments.check_client_optimizer(0.25, None)) == 0.25
  adam = tff.learning.optimizers.build_adam(0.01)
  assert process_arguments.check_client_optimizer(None, adam) is adam
  assert learning_rate(process_arguments.check_client_optimizer(
      None, lambda: adam)) == pytest.approx(0.01)
  for beta, optimizer, text in ((0.1, adam, 'set it in client_optimizer_fn'),
                                (None, None, 'is required unless')):
    with pytest.raises(checks.ArgumentError, match=text) as e:
      process_arguments.check_client_optimizer(beta, optimizer)
    assert e.value.name == 'beta'
  assert learning_rate(process_arguments.check_server_optimizer(None)) == 1.0
  with pytest.raises(TypeError, match='server_optimizer_fn'):
    process_arguments.check_server_optimizer('sgd')
