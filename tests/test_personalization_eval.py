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
from perfed_tff.program import population_eval
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
  data = population_eval.client_input(_dataset(x_tr, y_tr), _dataset(x_te, y_te),
                                 num_steps=1, adapt_batch_size=None, seed=0)
  out = ev(_model_weights(kernel, bias), [data])[0]
  w1 = np_sgd(w0, [(x_tr, y_tr)], 0.5)
  np.testing.assert_allclose(out['metrics']['step_1']['loss'],
                             np_loss(w1, x_te, y_te), rtol=2e-5)
  assert out['num_adaptation_examples'] == 10


def test_adaptation_batches_come_from_train_only():
  x_tr, y_tr, x_te, y_te = _client(0, 13, 6, 2.0)
  for batch_size in (4, None):
    data = population_eval.client_input(_dataset(x_tr, y_tr), _dataset(x_te, y_te),
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
  result = population_eval.evaluate_population(
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
  again = population_eval.evaluate_population(
      eval_1_2, _model_weights(kernel, bias), train, test,
      adapt_batch_size=5, seed=0)
  np.testing.assert_array_equal(again.accuracy[1], result.accuracy[1])


def test_empty_test_client_left_out_of_summary():
  result = population_eval.PopulationResult(
      ['a', 'b'], np.array([4, 0]), {0: np.array([0.5, 0.0])},
      {0: np.array([1.0, 0.0])}, np.array([0, 0]))
  s = population_eval.summarize(result)
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
  population_eval.evaluate_population(
      ev, weights, data_fixtures.LoggingClientData(task.train, log, 'train'),
      data_fixtures.LoggingClientData(task.test, log, 'test'),
      protocol=protocol)
  assert dict(_c.Counter(split for split, _ in log)) == reads


# ---- awkward clients (empty train, empty test, one example) on every model ----
#
# TFF's EMNIST has writers whose test split is empty, and writers with one or
# two train examples. A forward pass of the EMNIST CNN on zero examples fails
# on CPU (TensorFlow's oneDNN fused Conv2D returns its input for an empty
# batch: "input depth must be evenly divisible by filter depth: 1 vs 32"), so
# the evaluation must never run the model on an empty batch.

def _awkward_models():
  from perfed_tff.models import emnist as emnist_models  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import shakespeare as shakespeare_models  # pylint: disable=g-import-not-at-top
  ce = lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  # name: (model_fn, keras_model_fn, loss_fn, batch spec, ignore_label)
  return {
      'linear': (linear.softmax_regression_model_fn(DIM, CLASSES),
                 lambda: linear.create_softmax_regression(DIM, CLASSES), ce,
                 linear.element_spec(DIM), None),
      'digits_mlp': (mlp.mlp_model_fn((64,), 10), mlp.create_digits_mlp,
                     mlp.loss_fn, mlp.element_spec((64,)), None),
      'emnist_cnn': (emnist_models.emnist_cnn_model_fn(10),
                     lambda: emnist_models.create_emnist_cnn(10),
                     emnist_models.loss_fn, emnist_models.element_spec(),
                     None),
      'shakespeare_lstm': (
          shakespeare_models.char_lstm_model_fn(20, 6, lstm_units=8),
          lambda: shakespeare_models.create_char_lstm(20, 6, lstm_units=8),
          shakespeare_models.loss_fn, shakespeare_models.element_spec(6),
          shakespeare_models.PAD_ID),
  }


AWKWARD_MODELS = ('linear', 'digits_mlp', 'emnist_cnn', 'shakespeare_lstm')

# client id: (train examples, test examples)
AWKWARD_CLIENTS = collections.OrderedDict([
    ('normal', (5, 4)), ('empty_test', (3, 0)), ('empty_train', (0, 3)),
    ('one_example', (1, 1)), ('both_empty', (0, 0))])


def _examples(spec, n, seed):
  """`n` unbatched examples of the batch `spec` (labels >= 1, so a pad id 0
  never hides them)."""
  rng = np.random.default_rng(seed)
  out = collections.OrderedDict()
  for key, s in spec.items():
    shape = [n] + s.shape.as_list()[1:]
    if s.dtype == tf.float32:
      out[key] = rng.random(shape).astype(np.float32)
    else:
      out[key] = rng.integers(1, 3, shape).astype(s.dtype.as_numpy_dtype)
  return out


class _ArraysClientData:
  """A ClientData of {client id: examples}, with the spec of `spec`'s
  examples (also for a client without any)."""

  def __init__(self, arrays, spec):
    self._arrays = arrays
    self._spec = collections.OrderedDict(
        (k, tf.TensorSpec(s.shape[1:], s.dtype)) for k, s in spec.items())

  @property
  def client_ids(self):
    return list(self._arrays)

  @property
  def element_type_structure(self):
    return self._spec

  def create_tf_dataset_for_client(self, cid):
    return tf.data.Dataset.from_tensor_slices(self._arrays[cid])


def _awkward_population(spec, client_ids):
  """(train, test) ClientData of `client_ids` of AWKWARD_CLIENTS (a
  client's examples are the same in every population)."""
  train, test = {}, {}
  for cid in client_ids:
    n_train, n_test = AWKWARD_CLIENTS[cid]
    i = list(AWKWARD_CLIENTS).index(cid)
    train[cid] = _examples(spec, n_train, 2 * i)
    test[cid] = _examples(spec, n_test, 2 * i + 1)
  return _ArraysClientData(train, spec), _ArraysClientData(test, spec)


def _initial(model_fn):
  from perfed_tff import per_fedavg  # pylint: disable=g-import-not-at-top
  return per_fedavg.initial_model_weights_computation(model_fn)()


@pytest.mark.parametrize('name', AWKWARD_MODELS)
def test_awkward_clients_are_skipped_or_counted_never_a_crash(name):
  """Through `evaluate_population` (the training program's path, batches
  built on the worker): clients without test examples are left out and
  counted, clients without train examples keep the global model (no step)
  and are counted, a one-example client adapts; the other clients' numbers
  are those of the population without the awkward clients."""
  model_fn, _, _, spec, ignore_label = _awkward_models()[name]
  weights = _initial(model_fn)
  ev = evaluation.build_personalized_evaluation(
      model_fn, alpha=0.1, adaptation_steps=(1, 2), ignore_label=ignore_label)
  train, test = _awkward_population(spec, list(AWKWARD_CLIENTS))
  for protocol in ('heldout', 'paper'):
    result = population_eval.evaluate_population(
        ev, weights, train, test, adapt_batch_size=2, seed=0,
        protocol=protocol)
    by_id = dict(zip(result.client_ids, range(len(result.client_ids))))
    assert result.client_ids == list(AWKWARD_CLIENTS)
    np.testing.assert_array_equal(
        result.num_test_examples, [n for _, n in AWKWARD_CLIENTS.values()])
    steps_taken = dict(zip(result.client_ids, result.num_adaptation_steps))
    adapt_split = 0 if protocol == 'heldout' else 1
    for cid, sizes in AWKWARD_CLIENTS.items():
      assert steps_taken[cid] == (2 if sizes[adapt_split] else 0), cid
    for k in (0, 1, 2):
      assert np.all(np.isfinite(result.loss[k])), (protocol, k)
      assert np.all(np.isfinite(result.accuracy[k])), (protocol, k)
    # No example to adapt on: the measured model is the global one.
    if protocol == 'heldout':
      i = by_id['empty_train']
      for k in (1, 2):
        assert result.loss[k][i] == result.loss[0][i]
        assert result.accuracy[k][i] == result.accuracy[0][i]
    s = result.summary()
    assert s['num_clients'] == 3
    assert s['num_clients_empty'] == 2
    assert s['num_clients_without_step'] == (1 if protocol == 'heldout' else 0)
    assert s['num_test_examples'] == 8
    for k in (0, 1, 2):
      assert all(np.isfinite(v) for v in s[f'step_{k}'].values()), (protocol, k)
    # The measured clients' step-0 numbers are those of a population without
    # the awkward clients (after a step too, except for the CNN, whose step
    # samples dropout masks).
    plain = ('normal', 'one_example')
    ref = population_eval.evaluate_population(
        ev, weights, *_awkward_population(spec, plain), seed=0,
        adapt_batch_size=2, protocol=protocol)
    compared = (0,) if name == 'emnist_cnn' else (0, 1, 2)
    for j, cid in enumerate(plain):
      for k in compared:
        assert result.loss[k][by_id[cid]] == ref.loss[k][j], (cid, k)
        assert result.accuracy[k][by_id[cid]] == ref.accuracy[k][j], (cid, k)


@pytest.mark.parametrize('name', AWKWARD_MODELS)
def test_awkward_clients_with_a_functional_model(name):
  """The FunctionalModel path, with the batched input given directly: an
  empty test split, no train batch, an empty train batch (no step) and one
  example."""
  from perfed_tff.data import task as task_lib  # pylint: disable=g-import-not-at-top
  model_fn, keras_model_fn, loss_fn, spec, ignore_label = (
      _awkward_models()[name])
  functional = task_lib.functional_model(keras_model_fn, loss_fn, spec,
                                         lambda: [])
  weights = _initial(model_fn)
  ev = evaluation.build_personalized_evaluation(
      functional, alpha=0.1, adaptation_steps=(1, 2),
      ignore_label=ignore_label)

  def data(train_sizes, n_test, seed):
    """Train batches of the given sizes (0: an empty batch), then test."""
    batches = [tf.data.Dataset.from_tensors(_examples(spec, n, seed + i))
               for i, n in enumerate(train_sizes)]
    train = (tf.data.Dataset.from_tensor_slices(_examples(spec, 0, 0))
             .batch(1))
    for b in batches:
      train = train.concatenate(b)
    return collections.OrderedDict(
        train_data=train,
        test_data=tf.data.Dataset.from_tensor_slices(
            _examples(spec, n_test, seed + 50)).batch(2))

  cases = collections.OrderedDict([
      ('empty_test', ([2, 2], 0)), ('no_train_batch', ([], 3)),
      ('empty_train_batch', ([0, 0], 3)), ('one_example', ([1, 1], 1)),
      ('empty_then_one', ([0, 1], 2))])
  outputs = ev(weights, [data(sizes, n, 10 * i)
                         for i, (sizes, n) in enumerate(cases.values())])
  out = dict(zip(cases, outputs))
  for cid, (sizes, n_test) in cases.items():
    o = out[cid]
    assert int(o['num_test_examples']) == n_test, cid
    assert int(o['num_adaptation_steps']) == sum(1 for n in sizes if n), cid
    assert int(o['num_adaptation_examples']) == sum(sizes), cid
    for k in ('step_0', 'step_1', 'step_2'):
      for m in ('loss', 'accuracy'):
        assert np.isfinite(float(o['metrics'][k][m])), (cid, k, m)
  assert float(out['empty_test']['metrics']['step_1']['loss']) == 0.0
  for cid in ('no_train_batch', 'empty_train_batch'):
    m = out[cid]['metrics']
    assert m['step_1'] == m['step_0'] and m['step_2'] == m['step_0'], cid
  m = out['one_example']['metrics']
  assert float(m['step_1']['loss']) != float(m['step_0']['loss'])


def test_awkward_clients_reach_the_eval_metrics(tmp_path):
  """The training program's evaluation of the EMNIST CNN on a TFF-format
  file with a writer without test examples (listed with 0 examples) and one
  with a single train example: the counts are in its flat metrics (the
  columns of eval.csv)."""
  import os  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import config as config_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import population_eval  # pylint: disable=g-import-not-at-top
  sizes = {'f0000_00': (4, 2), 'f0001_00': (3, 0), 'f0002_00': (1, 1),
           'f0003_00': (2, 2)}
  splits = {}
  for prefix, classes in (('digits_only', 10), ('all', 62)):
    for split, part in (('train', 0), ('test', 1)):
      splits[f'{prefix}_{split}'] = {
          cid: [data_fixtures.emnist_example(
              data_fixtures.emnist_pixels(k, i + 10 * part),
              data_fixtures.emnist_label(k, i + 10 * part, classes))
                for i in range(n[part])]
          for k, (cid, n) in enumerate(sizes.items())}
  data_fixtures.write_sql_client_data(
      os.path.join(tmp_path, 'emnist_all.sqlite'), splits)
  config = config_lib.validate(config_lib.TrainingConfig(
      dataset='emnist', cache_dir=str(tmp_path), eval_clients=0,
      eval_steps=(1,), eval_protocols=('heldout', 'paper'), batch_size=2,
      root_output_dir=str(tmp_path / 'out')))
  task = config_lib.load_task(config)
  assert sorted(task.test.client_ids) == sorted(sizes)
  evaluate = population_eval.build_evaluate_fn(config, task)
  flat = metrics_lib.flatten_metrics(evaluate(_initial(task.model_fn)))
  for population in ('seen', 'seen_paper'):
    assert flat[f'{population}/num_clients'] == 3
    assert flat[f'{population}/num_clients_empty'] == 1
    assert flat[f'{population}/num_clients_without_step'] == 0
    assert flat[f'{population}/num_test_examples'] == 5
    assert np.isfinite(flat[f'{population}/step_1/accuracy_mean'])
