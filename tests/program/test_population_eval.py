"""The evaluation's Python driver (`perfed_tff/program/population_eval.py`):
`evaluate_population` and its summaries, the protocols, awkward clients skipped or counted, the
training program's evaluate function and its client sampler."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import perfed_tff
from perfed_tff import personalization_eval as evaluation
from perfed_tff.program import population_eval
from perfed_tff.program import round_data
from tests import data_fixtures
from tests import tff_helpers as h


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
    return h.dataset(*next(iter(self._arrays.values()))).element_spec

  def create_tf_dataset_for_client(self, cid):
    self.calls.append(cid)
    return h.dataset(*self._arrays[cid])


def test_evaluate_population_and_summary(eval_1_2):
  kernel, bias = h.eval_initial_weights()
  clients = {f'c{i}': h.eval_client(i, 10 + i, 3 + 2 * i, 0.5)
             for i in range(4)}
  train = _SpyClientData({c: v[:2] for c, v in clients.items()})
  test = _SpyClientData({c: v[2:] for c, v in clients.items()})
  result = population_eval.evaluate_population(
      eval_1_2, h.model_weights(kernel, bias), train, test, alpha=0.3,
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
      eval_1_2, h.model_weights(kernel, bias), train, test, alpha=0.3,
      adapt_batch_size=5, seed=0)
  np.testing.assert_array_equal(again.accuracy[1], result.accuracy[1])


def test_empty_test_client_left_out_of_summary():
  result = population_eval.PopulationResult(
      ['a', 'b'], np.array([4, 0]), {0: np.array([0.5, 0.0])},
      {0: np.array([1.0, 0.0])}, np.array([0, 0]))
  s = population_eval.summarize(result)
  assert s['num_clients'] == 1 and s['num_clients_empty'] == 1
  assert s['step_0']['accuracy_mean'] == 0.5


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
  ev = evaluation.build_personalized_evaluation(task.model_fn)
  weights = perfed_tff.build_per_fedavg(
      task.model_fn, variant='fo', alpha=0.1, beta=0.1, local_steps=1)
  weights = weights.get_model_weights(weights.initialize())
  population_eval.evaluate_population(
      ev, weights, data_fixtures.LoggingClientData(task.train, log, 'train'),
      data_fixtures.LoggingClientData(task.test, log, 'test'), alpha=0.1,
      protocol=protocol)
  assert dict(_c.Counter(split for split, _ in log)) == reads


# ---- awkward clients (see tff_helpers.awkward_models) ----

# client id: (train examples, test examples)
AWKWARD_CLIENTS = collections.OrderedDict([
    ('normal', (5, 4)), ('empty_test', (3, 0)), ('empty_train', (0, 3)),
    ('one_example', (1, 1)), ('both_empty', (0, 0))])


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
    train[cid] = h.examples(spec, n_train, 2 * i)
    test[cid] = h.examples(spec, n_test, 2 * i + 1)
  return _ArraysClientData(train, spec), _ArraysClientData(test, spec)


@pytest.mark.parametrize('name', h.AWKWARD_MODELS)
def test_awkward_clients_are_skipped_or_counted_never_a_crash(name):
  """Through `evaluate_population` (the training program's path, batches
  built on the worker): clients without test examples are left out and
  counted, clients without train examples keep the global model (no step)
  and are counted, a one-example client adapts; the other clients' numbers
  are those of the population without the awkward clients."""
  model_fn, _, _, spec, ignore_label = h.awkward_models()[name]
  weights = h.initial_weights(model_fn)
  ev = evaluation.build_personalized_evaluation(
      model_fn, adaptation_steps=(1, 2), ignore_label=ignore_label)
  train, test = _awkward_population(spec, list(AWKWARD_CLIENTS))
  for protocol in ('heldout', 'paper'):
    result = population_eval.evaluate_population(
        ev, weights, train, test, alpha=0.1, adapt_batch_size=2, seed=0,
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
        ev, weights, *_awkward_population(spec, plain), alpha=0.1, seed=0,
        adapt_batch_size=2, protocol=protocol)
    compared = (0,) if name == 'emnist_cnn' else (0, 1, 2)
    for j, cid in enumerate(plain):
      for k in compared:
        assert result.loss[k][by_id[cid]] == ref.loss[k][j], (cid, k)
        assert result.accuracy[k][by_id[cid]] == ref.accuracy[k][j], (cid, k)


def test_awkward_clients_reach_the_eval_metrics(tmp_path):
  """The training program's evaluation of the EMNIST CNN on a TFF-format
  file with a writer without test examples (listed with 0 examples) and one
  with a single train example: the counts are in its flat metrics (the
  columns of eval.csv)."""
  import os  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import training_loop  # pylint: disable=g-import-not-at-top
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
  config = settings_lib.validate(settings_lib.TrainingConfig(
      dataset='emnist', cache_dir=str(tmp_path), eval_clients=0,
      eval_steps=(1,), eval_protocols=('heldout', 'paper'), batch_size=2,
      root_output_dir=str(tmp_path / 'out')))
  task = round_data.load_task(config)
  assert sorted(task.test.client_ids) == sorted(sizes)
  evaluate = training_loop.build_evaluate_fn(config, task)
  flat = metrics_lib.flatten_metrics(
      evaluate(h.initial_weights(task.model_fn), config.alpha))
  for population in ('seen', 'seen_paper'):
    assert flat[f'{population}/num_clients'] == 3
    assert flat[f'{population}/num_clients_empty'] == 1
    assert flat[f'{population}/num_clients_without_step'] == 0
    assert flat[f'{population}/num_test_examples'] == 5
    assert np.isfinite(flat[f'{population}/step_1/accuracy_mean'])


def test_eval_client_sampler_is_seeded_and_capped():
  ids = [f'c{i}' for i in range(20)]
  a = population_eval.sample_eval_clients(ids, 5, 0, 'seen')
  assert a == population_eval.sample_eval_clients(ids, 5, 0, 'seen')
  assert len(a) == 5 and a == sorted(a) and set(a) <= set(ids)
  assert a != population_eval.sample_eval_clients(ids, 5, 0, 'unseen')
  assert population_eval.sample_eval_clients(ids, 0, 0, 'seen') == ids
  assert population_eval.sample_eval_clients(ids, 50, 0, 'seen') == ids
