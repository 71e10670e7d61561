"""The LearningProcess shape, server averaging, faults and argument checks."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import algorithms
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib
from perfed_tff.models import linear
from tests import numpy_reference as ref

DIM, CLASSES = 5, 3
MODEL_FN = linear.softmax_regression_model_fn(DIM, CLASSES)


def _dataset(x, y, batch_size):
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x, y=y)).batch(batch_size)


def _clients(rng, sizes):
  out = []
  for n in sizes:
    out.append((rng.normal(size=(n, DIM)).astype(np.float32),
                rng.integers(0, CLASSES, n).astype(np.int32)))
  return out


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
  out = process.next(state, [_dataset(x, y, bs) for x, y in data])
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
  empty = _dataset(x[:0], y[:0], 4)
  for variant in ['fo', 'hf', 'maml']:
    process = perfed_tff.build_per_fedavg(
        MODEL_FN, variant=variant, alpha=0.1, beta=0.1, local_steps=2)
    state = process.initialize()
    alone = process.next(state, [_dataset(x, y, 4)])
    with_empty = process.next(state, [_dataset(x, y, 4), empty])
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
  good = process.next(state, [_dataset(x, y, 4)])
  mixed = process.next(state, [_dataset(x, y, 4), _dataset(bad_x, y, 4)])
  for a, b in zip(process.get_model_weights(good.state).trainable,
                  process.get_model_weights(mixed.state).trainable):
    np.testing.assert_allclose(a, b, atol=1e-6)
  train = mixed.metrics['client_work']['train']
  assert train['num_non_finite_updates'] == 1
  assert np.isfinite(train['loss'])


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
  out = process.next(state, [_dataset(x, y, 4) for x, y in data])
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
