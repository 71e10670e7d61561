"""`build_personalized_evaluation`: numbers against a numpy reference and
against TFF's own `build_personalization_eval_computation`, test data never
used for adaptation, a FunctionalModel and TFF's unbatched client input,
awkward clients. The Python driver (`evaluate_population`, summaries) is
tested in tests/program/test_population_eval.py."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import personalization_data
from perfed_tff import personalization_eval as evaluation
from perfed_tff.models import linear
from tests import tff_helpers as h


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


# ---- against the numpy reference (tff_helpers' EVAL_DIM-input clients) ----

@pytest.fixture(scope='module')
def model_fn():
  return linear.softmax_regression_model_fn(h.EVAL_DIM, h.EVAL_CLASSES)


def test_type_signature(eval_1_2):
  sig = eval_1_2.type_signature
  assert sig.parameter[0].placement is tff.SERVER
  assert sig.parameter[1].placement is tff.SERVER   # alpha
  assert sig.parameter[1].member == tff.TensorType(np.float32)
  assert sig.parameter[2].placement is tff.CLIENTS
  assert sig.result.placement is tff.CLIENTS
  assert list(tff.structure.name_list(sig.parameter[2].member)) == [
      'train_data', 'test_data']
  assert eval_1_2.adaptation_steps == (1, 2)
  assert list(tff.structure.name_list(sig.result.member.metrics)) == [
      'step_0', 'step_1', 'step_2']


def test_matches_numpy_reference_before_and_after_steps(eval_1_2):
  kernel, bias = h.eval_initial_weights()
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  batch = 4
  clients = [h.eval_client(s, n_tr, n_te, shift) for s, n_tr, n_te, shift in
             [(0, 12, 7, 1.0), (1, 9, 5, -0.5), (2, 16, 11, 0.3)]]
  inputs = []
  for x_tr, y_tr, x_te, y_te in clients:
    inputs.append(collections.OrderedDict(
        train_data=h.dataset(x_tr, y_tr).batch(batch),  # in order, no shuffle
        test_data=h.dataset(x_te, y_te).batch(3)))     # test batches of 3
  outputs = eval_1_2(h.model_weights(kernel, bias), 0.3, inputs)
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
  ev = evaluation.build_personalized_evaluation(model_fn, adaptation_steps=1)
  kernel, bias = h.eval_initial_weights(5)
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  x_tr, y_tr, x_te, y_te = h.eval_client(7, 10, 6, 0.7)
  data = personalization_data.client_input(
      h.dataset(x_tr, y_tr), h.dataset(x_te, y_te), num_steps=1,
      adapt_batch_size=None, seed=0)
  out = ev(h.model_weights(kernel, bias), 0.5, [data])[0]
  w1 = np_sgd(w0, [(x_tr, y_tr)], 0.5)
  np.testing.assert_allclose(out['metrics']['step_1']['loss'],
                             np_loss(w1, x_te, y_te), rtol=2e-5)
  assert out['num_adaptation_examples'] == 10


def test_changing_test_data_never_changes_adapted_model(eval_1_2):
  """Same train data, two different test sets: the after-step metrics on each
  are those of the one model adapted on the train data."""
  kernel, bias = h.eval_initial_weights(11)
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  x_tr, y_tr, x_a, y_a = h.eval_client(3, 8, 9, 1.5)
  _, _, x_b, y_b = h.eval_client(4, 8, 9, -1.5)
  inputs = [collections.OrderedDict(train_data=h.dataset(x_tr, y_tr).batch(4),
                                    test_data=h.dataset(x, y).batch(4))
            for x, y in ((x_a, y_a), (x_b, y_b))]
  out = eval_1_2(h.model_weights(kernel, bias), 0.3, inputs)
  w1 = np_sgd(w0, [(x_tr[:4], y_tr[:4])], 0.3)
  for o, (x, y) in zip(out, ((x_a, y_a), (x_b, y_b))):
    np.testing.assert_allclose(o['metrics']['step_1']['loss'],
                               np_loss(w1, x, y), rtol=2e-5)


@pytest.mark.parametrize('kwargs', [dict(adaptation_steps=(0,)),
                                    dict(adaptation_steps=())])
def test_rejects_bad_arguments(model_fn, kwargs):
  with pytest.raises(ValueError):
    evaluation.build_personalized_evaluation(model_fn, **kwargs)


@pytest.mark.parametrize('alpha', [0.0, -1.0, float('nan'), 1e9])
def test_rejects_a_bad_alpha_at_the_call(eval_1_2, alpha):
  kernel, bias = h.eval_initial_weights()
  with pytest.raises(ValueError, match='`alpha`'):
    eval_1_2(h.model_weights(kernel, bias), alpha, [])


def test_one_evaluation_serves_every_alpha(eval_1_2):
  """alpha is an argument of the computation: the same traced evaluation,
  at two step sizes, matches the numpy reference at each."""
  kernel, bias = h.eval_initial_weights(2)
  w0 = (kernel.astype(np.float64), bias.astype(np.float64))
  x_tr, y_tr, x_te, y_te = h.eval_client(5, 8, 6, 0.4)
  inputs = [collections.OrderedDict(train_data=h.dataset(x_tr, y_tr).batch(4),
                                    test_data=h.dataset(x_te, y_te).batch(3))]
  for alpha in (0.05, 0.8):
    out = eval_1_2(h.model_weights(kernel, bias), alpha, inputs)[0]
    w1 = np_sgd(w0, [(x_tr[:4], y_tr[:4])], alpha)
    np.testing.assert_allclose(out['metrics']['step_1']['loss'],
                               np_loss(w1, x_te, y_te), rtol=2e-5)


# ---- awkward clients (see tff_helpers.awkward_models) ----

@pytest.mark.parametrize('name', h.AWKWARD_MODELS)
def test_awkward_clients_with_a_functional_model(name):
  """The FunctionalModel path, with the batched input given directly: an
  empty test split, no train batch, an empty train batch (no step) and one
  example."""
  from perfed_tff.data import task as task_lib  # pylint: disable=g-import-not-at-top
  model_fn, keras_model_fn, loss_fn, spec, ignore_label = (
      h.awkward_models()[name])
  functional = task_lib.functional_model(keras_model_fn, loss_fn, spec,
                                         lambda: [])
  weights = h.initial_weights(model_fn)
  ev = evaluation.build_personalized_evaluation(
      functional, adaptation_steps=(1, 2), ignore_label=ignore_label)

  def data(train_sizes, n_test, seed):
    """Train batches of the given sizes (0: an empty batch), then test."""
    batches = [tf.data.Dataset.from_tensors(h.examples(spec, n, seed + i))
               for i, n in enumerate(train_sizes)]
    train = (tf.data.Dataset.from_tensor_slices(h.examples(spec, 0, 0))
             .batch(1))
    for b in batches:
      train = train.concatenate(b)
    return collections.OrderedDict(
        train_data=train,
        test_data=tf.data.Dataset.from_tensor_slices(
            h.examples(spec, n_test, seed + 50)).batch(2))

  cases = collections.OrderedDict([
      ('empty_test', ([2, 2], 0)), ('no_train_batch', ([], 3)),
      ('empty_train_batch', ([0, 0], 3)), ('one_example', ([1, 1], 1)),
      ('empty_then_one', ([0, 1], 2))])
  outputs = ev(weights, 0.1, [data(sizes, n, 10 * i)
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


# ---- against TFF's build_personalization_eval_computation ----
#
# Same strategy: k SGD steps at alpha on the client's train batches in order,
# on TFF_DIM-input clients each with its own labelling rule.

TFF_DIM, TFF_CLASSES = 5, 3
ALPHA, BATCH, STEPS = 1.0, 4, (1, 3)


def _tff_client(seed, n_train, n_test):
  rng = np.random.default_rng(seed)
  rule = rng.normal(0, 2.0, (TFF_DIM, TFF_CLASSES))   # the client's own rule
  def part(n, shift):
    x = rng.normal(shift, 1.0, (n, TFF_DIM)).astype(np.float32)
    y = np.argmax(x @ rule, axis=1).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x, y=y))
  return collections.OrderedDict(train_data=part(n_train, 0.5),
                                 test_data=part(n_test, -0.5))


# Unbatched, as TFF's computation takes them; the 3rd client has train data
# for 2 of the 3 steps only.
TFF_CLIENTS = [_tff_client(0, 14, 9), _tff_client(1, 20, 6),
               _tff_client(2, 7, 11)]


def _tff_weights(seed=3):
  rng = np.random.default_rng(seed)
  return tff.learning.models.ModelWeights(
      trainable=[rng.normal(0, 0.7, (TFF_DIM, TFF_CLASSES)).astype(np.float32),
                 rng.normal(0, 0.2, TFF_CLASSES).astype(np.float32)],
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
  model_fn = linear.softmax_regression_model_fn(TFF_DIM, TFF_CLASSES)
  computation = tff.learning.algorithms.build_personalization_eval_computation(
      model_fn,
      collections.OrderedDict((f'step_{k}', _k_sgd_steps(k)) for k in STEPS),
      _evaluate, max_num_clients=10)
  out = computation(_tff_weights(), TFF_CLIENTS)
  # Reservoir sampling may reorder clients: key them by their test data.
  order = [float(f) for f in out['baseline_metrics']['fingerprint']]
  return out, order


def _fingerprint(client):
  return float(sum(e['x'].sum() for e in client['test_data'].as_numpy_iterator()))


def _check_against_tff(ours, tff_results):
  out, order = tff_results
  assert len(ours) == len(TFF_CLIENTS)
  for client, result in zip(TFF_CLIENTS, ours):
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
      linear.softmax_regression_model_fn(TFF_DIM, TFF_CLASSES),
      adaptation_steps=STEPS, input_format='unbatched', batch_size=BATCH)
  result = ours(_tff_weights(), ALPHA, TFF_CLIENTS)
  _check_against_tff(result, tff_results)
  assert [int(r['num_adaptation_steps']) for r in result] == [3, 3, 2]


def test_functional_model_matches_tff(tff_results):
  functional = tff.learning.models.functional_model_from_keras(
      linear.create_softmax_regression(TFF_DIM, TFF_CLASSES),
      loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=linear.element_spec(TFF_DIM))
  ours = evaluation.build_personalized_evaluation(
      functional, adaptation_steps=STEPS, input_format='unbatched',
      batch_size=BATCH)
  _check_against_tff(ours(_tff_weights(), ALPHA, TFF_CLIENTS), tff_results)
  # The batched form (today's input) gives the same numbers.
  batched = evaluation.build_personalized_evaluation(
      functional, adaptation_steps=STEPS)
  _check_against_tff(batched(_tff_weights(), ALPHA, [
      collections.OrderedDict(train_data=c['train_data'].batch(BATCH),
                              test_data=c['test_data'].batch(5))
      for c in TFF_CLIENTS]), tff_results)


def test_bad_input_format():
  with pytest.raises(ValueError, match='`input_format`'):
    evaluation.build_personalized_evaluation(
        linear.softmax_regression_model_fn(TFF_DIM, TFF_CLASSES),
        input_format='ragged')
