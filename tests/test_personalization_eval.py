"""Personalized evaluation: numbers against a numpy reference, test data never
used for adaptation, summaries."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import personalization_eval as evaluation
from perfed_tff.models import linear
from tests import data_fixtures

DIM, CLASSES = 4, 3


# ---- numpy reference for softmax regression (logits = x W + b) ----

def _softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def np_loss(w, x, y):
  p = _softmax(x.astype(np.float64) @ w[0] + w[1])
  return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def np_accuracy(w, x, y):
  return float(np.mean(np.argmax(x @ w[0] + w[1], axis=1) == y))


def np_grad(w, x, y):
  p = _softmax(x.astype(np.float64) @ w[0] + w[1])
  p[np.arange(len(y)), y] -= 1.0
  return x.T @ p / len(y), p.mean(axis=0)


def np_sgd(w, batches, alpha):
  for x, y in batches:
    g = np_grad(w, x, y)
    w = (w[0] - alpha * g[0], w[1] - alpha * g[1])
  return w


# ---- fixtures ----

def _initial_weights(seed=3):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(0, 0.5, (DIM, CLASSES)).astype(np.float32)
  bias = rng.normal(0, 0.1, CLASSES).astype(np.float32)
  return kernel, bias


def _model_weights(kernel, bias):
  return tff.learning.models.ModelWeights(trainable=[kernel, bias],
                                          non_trainable=[])


def _client(seed, n_train, n_test, shift):
  rng = np.random.default_rng(seed)
  x_tr = rng.normal(shift, 1, (n_train, DIM)).astype(np.float32)
  y_tr = rng.integers(0, CLASSES, n_train).astype(np.int32)
  # Test labels differ in distribution from train, so a step on the test data
  # would give different numbers than a step on the train data.
  x_te = rng.normal(-shift, 1, (n_test, DIM)).astype(np.float32)
  y_te = ((np.arange(n_test) + seed) % CLASSES).astype(np.int32)
  return x_tr, y_tr, x_te, y_te


def _dataset(x, y):
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))


@pytest.fixture(scope='module')
def model_fn():
  return linear.softmax_regression_model_fn(DIM, CLASSES)


@pytest.fixture(scope='module')
def eval_1_2(model_fn):
  return evaluation.build_personalized_evaluation(
      model_fn, alpha=0.3, adaptation_steps=(2, 1))


def test_type_signature(eval_1_2):
  sig = eval_1_2.type_signature
  assert sig.parameter[0].placement is tff.SERVER
  assert sig.parameter[1].placement is tff.CLIENTS
  assert sig.result.placement is tff.CLIENTS
  assert list(tff.structure.name_list(sig.parameter[1].member)) == [
      'train_data', 'test_data']
  assert eval_1_2.adaptation_steps == (1, 2)
  assert list(tff.structure.name_list(sig.result.member.metrics)) == [
      'step_0', 'step_1', 'step_2']


def test_matches_numpy_reference_before_and_after_steps(eval_1_2):
  kernel, bias = _initial_weights()
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  batch = 4
  clients = [_client(s, n_tr, n_te, shift) for s, n_tr, n_te, shift in
             [(0, 12, 7, 1.0), (1, 9, 5, -0.5), (2, 16, 11, 0.3)]]
  inputs = []
  for x_tr, y_tr, x_te, y_te in clients:
    inputs.append(collections.OrderedDict(
        train_data=_dataset(x_tr, y_tr).batch(batch),  # in order, no shuffle
        test_data=_dataset(x_te, y_te).batch(3)))     # test batches of 3
  outputs = eval_1_2(_model_weights(kernel, bias), inputs)
  assert len(outputs) == len(clients)
  for out, (x_tr, y_tr, x_te, y_te) in zip(outputs, clients):
    batches = [(x_tr[i:i + batch], y_tr[i:i + batch]) for i in (0, batch)]
    w1 = np_sgd(w0, batches[:1], 0.3)
    w2 = np_sgd(w0, batches[:2], 0.3)
    for key, w in (('step_0', w0), ('step_1', w1), ('step_2', w2)):
      m = out['metrics'][key]
      np.testing.assert_allclose(m['loss'], np_loss(w, x_te, y_te), rtol=2e-5)
      np.testing.assert_allclose(m['accuracy'], np_accuracy(w, x_te, y_te),
                                 atol=1e-6)
      # Adapting on the test data instead would give other numbers.
      if key != 'step_0':
        w_wrong = np_sgd(w0, [(x_te[:batch], y_te[:batch])], 0.3)
        assert abs(np_loss(w_wrong, x_te, y_te) - float(m['loss'])) > 1e-3
    assert out['num_test_examples'] == len(y_te)
    assert out['num_adaptation_steps'] == 2
    assert out['num_adaptation_examples'] == 2 * batch


def test_full_batch_adaptation_matches_numpy(model_fn):
  ev = evaluation.build_personalized_evaluation(model_fn, alpha=0.5,
                                                adaptation_steps=1)
  kernel, bias = _initial_weights(5)
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  x_tr, y_tr, x_te, y_te = _client(7, 10, 6, 0.7)
  data = evaluation.client_input(_dataset(x_tr, y_tr), _dataset(x_te, y_te),
                                 num_steps=1, adapt_batch_size=None, seed=0)
  out = ev(_model_weights(kernel, bias), [data])[0]
  w1 = np_sgd(w0, [(x_tr, y_tr)], 0.5)
  np.testing.assert_allclose(out['metrics']['step_1']['loss'],
                             np_loss(w1, x_te, y_te), rtol=2e-5)
  assert out['num_adaptation_examples'] == 10


def test_adaptation_batches_come_from_train_only():
  x_tr, y_tr, x_te, y_te = _client(0, 13, 6, 2.0)
  for batch_size in (4, None):
    data = evaluation.client_input(_dataset(x_tr, y_tr), _dataset(x_te, y_te),
                                   num_steps=5, adapt_batch_size=batch_size,
                                   seed=1)
    train_rows = {tuple(r) for r in x_tr}
    test_rows = {tuple(r) for r in x_te}
    batches = list(data['train_data'].as_numpy_iterator())
    assert len(batches) == 5
    for b in batches:
      assert len(b['x']) == (batch_size or 13)
      for row in b['x']:
        assert tuple(row) in train_rows and tuple(row) not in test_rows
    test_seen = np.concatenate([b['x'] for b in data['test_data']])
    assert {tuple(r) for r in test_seen} == test_rows


def test_changing_test_data_never_changes_adapted_model(eval_1_2):
  """Same train data, two different test sets: the after-step metrics on each
  are those of the one model adapted on the train data."""
  kernel, bias = _initial_weights(11)
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  x_tr, y_tr, x_a, y_a = _client(3, 8, 9, 1.5)
  _, _, x_b, y_b = _client(4, 8, 9, -1.5)
  inputs = [collections.OrderedDict(train_data=_dataset(x_tr, y_tr).batch(4),
                                    test_data=_dataset(x, y).batch(4))
            for x, y in ((x_a, y_a), (x_b, y_b))]
  out = eval_1_2(_model_weights(kernel, bias), inputs)
  w1 = np_sgd(w0, [(x_tr[:4], y_tr[:4])], 0.3)
  for o, (x, y) in zip(out, ((x_a, y_a), (x_b, y_b))):
    np.testing.assert_allclose(o['metrics']['step_1']['loss'],
                               np_loss(w1, x, y), rtol=2e-5)


class _SpyClientData:
  """Records which clients' datasets were created."""

  def __init__(self, arrays):
    self._arrays = arrays
    self.calls = []

  @property
  def client_ids(self):
    return sorted(self._arrays)

  @property
  def element_type_structure(self):
    return _dataset(*next(iter(self._arrays.values()))).element_spec

  def create_tf_dataset_for_client(self, cid):
    self.calls.append(cid)
    return _dataset(*self._arrays[cid])


def test_evaluate_population_and_summary(eval_1_2):
  kernel, bias = _initial_weights()
  clients = {f'c{i}': _client(i, 10 + i, 3 + 2 * i, 0.5) for i in range(4)}
  train = _SpyClientData({c: v[:2] for c, v in clients.items()})
  test = _SpyClientData({c: v[2:] for c, v in clients.items()})
  result = evaluation.evaluate_population(
      eval_1_2, _model_weights(kernel, bias), train, test,
      adapt_batch_size=5, seed=0)
  assert result.client_ids == ['c0', 'c1', 'c2', 'c3']
  assert sorted(train.calls) == sorted(test.calls) == result.client_ids
  np.testing.assert_array_equal(result.num_test_examples, [3, 5, 7, 9])
  s = result.summary()
  assert s['num_clients'] == 4 and s['num_test_examples'] == 24
  for k in (0, 1, 2):
    acc = result.accuracy[k]
    got = s[f'step_{k}']
    np.testing.assert_allclose(got['accuracy_mean'], acc.mean())
    np.testing.assert_allclose(got['accuracy_weighted'],
                               (acc * [3, 5, 7, 9]).sum() / 24)
    for p in (10, 50, 90):
      np.testing.assert_allclose(got[f'accuracy_p{p}'], np.percentile(acc, p))
  # Seeded: the same call gives the same numbers.
  again = evaluation.evaluate_population(
      eval_1_2, _model_weights(kernel, bias), train, test,
      adapt_batch_size=5, seed=0)
  np.testing.assert_array_equal(again.accuracy[1], result.accuracy[1])


def test_empty_test_client_left_out_of_summary():
  result = evaluation.PopulationResult(
      ['a', 'b'], np.array([4, 0]), {0: np.array([0.5, 0.0])},
      {0: np.array([1.0, 0.0])}, np.array([0, 0]))
  s = evaluation.summarize(result)
  assert s['num_clients'] == 1 and s['num_clients_empty'] == 1
  assert s['step_0']['accuracy_mean'] == 0.5


@pytest.mark.parametrize('kwargs', [dict(alpha=0.0), dict(alpha=-1.0),
                                    dict(alpha=0.1, adaptation_steps=(0,)),
                                    dict(alpha=0.1, adaptation_steps=())])
def test_rejects_bad_arguments(model_fn, kwargs):
  with pytest.raises(ValueError):
    evaluation.build_personalized_evaluation(model_fn, **kwargs)


@pytest.mark.parametrize('protocol,reads', [
    ('heldout', {'train': 3, 'test': 3}),   # step on train, metrics on test
    # Step and metrics on test: each client's test examples are read once
    # (`worker_datasets.client_examples` caches them) and used for both.
    ('paper', {'test': 3}),
])
def test_protocol_decides_where_the_step_data_come_from(protocol, reads):
  """By construction: the default never reads test data for the step; the
  paper protocol never reads the train split at all."""
  import collections as _c  # pylint: disable=g-import-not-at-top
  from perfed_tff.data import synthetic  # pylint: disable=g-import-not-at-top
  task = synthetic.load_synthetic(num_users=3, seed=0)
  log = []
  ev = evaluation.build_personalized_evaluation(task.model_fn, alpha=0.1)
  weights = perfed_tff.build_per_fedavg(
      task.model_fn, variant='fo', alpha=0.1, beta=0.1, local_steps=1)
  weights = weights.get_model_weights(weights.initialize())
  evaluation.evaluate_population(
      ev, weights, data_fixtures.LoggingClientData(task.train, log, 'train'),
      data_fixtures.LoggingClientData(task.test, log, 'test'),
      protocol=protocol)
  assert dict(_c.Counter(split for split, _ in log)) == reads
