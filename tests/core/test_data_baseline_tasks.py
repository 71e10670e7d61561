"""TFF's baseline tasks (`tff.simulation.baselines`) through
`perfed_tff.data.baseline_tasks`, on small `emnist_all.sqlite` and
`shakespeare.sqlite` files in TFF's format: the task's per-example
preprocessing, the personalized evaluation (`evaluate_population` takes the
task), Per-FedAvg rounds from the task's `model_fn`, and the training
program."""

import collections
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import checks
from perfed_tff import personalization_eval
from perfed_tff import process_arguments
from perfed_tff.data import baseline_tasks
from perfed_tff.data import shakespeare
from perfed_tff.data import task as task_lib
from perfed_tff.program import population_eval
from perfed_tff.program import training_loop
from tests import data_fixtures as fx
from tests import tff_helpers as h

L = 10   # Shakespeare sequence length.
EMNIST_IDS = [f'f{k:04d}_00' for k in range(4)]
CUPID = 'THE_TAMING_OF_THE_SHREW_CUPID'
# The researcher's train spec: two epochs, shuffled, batches of 5; all of it
# is replaced by the library's own batch streams.
TRAIN_SPEC = tff.simulation.baselines.ClientSpec(num_epochs=2, batch_size=5)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tff_cache'))
  fx.write_emnist(path, num_clients=4, train_per_client=6, test_per_client=2)
  fx.write_shakespeare(path)
  return path


@pytest.fixture(scope='module')
def emnist_task(cache_dir):
  # TFF's CNN without dropout: adaptation steps are deterministic, so two
  # evaluations can be compared step by step.
  return tff.simulation.baselines.emnist.create_character_recognition_task(
      TRAIN_SPEC, model_id='cnn', only_digits=True,
      cache_dir=cache_dir)


@pytest.fixture(scope='module')
def shakespeare_task(cache_dir):
  return tff.simulation.baselines.shakespeare.create_character_prediction_task(
      TRAIN_SPEC, sequence_length=L, cache_dir=cache_dir)


def _examples(client_data, cid):
  return list(client_data.create_tf_dataset_for_client(cid)
              .as_numpy_iterator())


def _key(example) -> bytes:
  return b''.join(np.asarray(t).tobytes() for t in example)


def test_emnist_examples_are_the_tasks_reshape(emnist_task):
  task = baseline_tasks.from_baseline_task(emnist_task)
  assert task.client_ids == EMNIST_IDS and task.test.client_ids == EMNIST_IDS
  assert task.ignore_label is None and task.unseen is None
  # TFF's (pixels [28, 28], label) -> (pixels[..., None], label), one example
  # per stored example, in the file's order (no shuffle, no epochs, no batch).
  assert task.element_spec == (tf.TensorSpec([None, 28, 28, 1], tf.float32),
                               tf.TensorSpec([None], tf.int32))
  for data, indices in ((task.train, range(0, 6)), (task.test, range(6, 8))):
    for k in (0, 3):
      got = _examples(data, EMNIST_IDS[k])
      assert len(got) == len(indices)
      for (x, y), i in zip(got, indices):
        assert x.shape == (28, 28, 1) and x.dtype == np.float32
        np.testing.assert_array_equal(x[..., 0], fx.emnist_pixels(k, i))
        assert y == fx.emnist_label(k, i, 10) and y.dtype == np.int32
  # The rule loses nothing: the task's own train preprocessing (2 epochs,
  # shuffled, batched) holds exactly these examples, twice each.
  cid = EMNIST_IDS[2]
  raw = emnist_task.datasets.train_data.create_tf_dataset_for_client(cid)
  trained = emnist_task.datasets.train_preprocess_fn(raw).unbatch()
  assert (collections.Counter(_key(e) for e in trained.as_numpy_iterator())
          == collections.Counter({_key(e): 2
                                  for e in _examples(task.train, cid)}))


def test_shakespeare_examples_are_the_tasks_token_sequences(
    shakespeare_task):
  task = baseline_tasks.from_baseline_task(shakespeare_task)
  assert task.client_ids == sorted(fx.SHAKESPEARE_CLIENTS)
  # TFF's model masks its pad token in accuracy: the evaluation does too.
  assert task.ignore_label == shakespeare.PAD == 0
  assert task.element_spec == (tf.TensorSpec([None, L], tf.int64),
                               tf.TensorSpec([None, L], tf.int64))
  for data, part in ((task.train, 0), (task.test, 1)):
    for cid in task.client_ids:
      expected = []
      for s in fx.SHAKESPEARE_CLIENTS[cid][part]:
        ids = ([shakespeare.BOS] + shakespeare.encode(s).tolist()
               + [shakespeare.EOS])
        ids += [shakespeare.PAD] * (-len(ids) % (L + 1))
        expected += [ids[i:i + L + 1] for i in range(0, len(ids), L + 1)]
      got = _examples(data, cid)
      assert len(got) == len(expected)
      for (x, y), chunk in zip(got, expected):
        np.testing.assert_array_equal(x, chunk[:-1])
        np.testing.assert_array_equal(y, chunk[1:])
  # 'Hail to thee, worthy Timon, and to all' (38 + 2 tokens) -> 4 sequences,
  # 'café ~' (7 bytes + 2) -> 1.
  assert len(_examples(task.train, CUPID)) == 5
  raw = shakespeare_task.datasets.train_data.create_tf_dataset_for_client(CUPID)
  trained = shakespeare_task.datasets.train_preprocess_fn(raw).unbatch()
  assert (collections.Counter(_key(e) for e in trained.as_numpy_iterator())
          == collections.Counter({_key(e): 2
                                  for e in _examples(task.train, CUPID)}))


def test_options_and_errors(emnist_task, cache_dir):
  task = baseline_tasks.from_baseline_task(emnist_task, num_unseen_users=1,
                                           seed=3, ignore_label=None)
  assert len(task.client_ids) == 3
  assert task.unseen[0].client_ids == task.unseen[1].client_ids
  assert set(task.client_ids) | set(task.unseen[0].client_ids) == set(
      EMNIST_IDS)
  # The same split objects for the same task (their examples are cached).
  assert (baseline_tasks.client_data_splits(emnist_task)
          == baseline_tasks.client_data_splits(emnist_task.datasets))
  with pytest.raises(TypeError, match='must be a tff.simulation.baselines'):
    baseline_tasks.from_baseline_task(emnist_task.datasets)
  with pytest.raises(checks.ArgumentError, match='`ignore_label` must be an'):
    baseline_tasks.from_baseline_task(emnist_task, ignore_label=-1)
  central = tff.simulation.baselines.BaselineTask(
      tff.simulation.baselines.BaselineTaskDatasets(
          emnist_task.datasets.train_data,
          emnist_task.datasets.get_centralized_test_data(),
          train_preprocess_fn=emnist_task.datasets.train_preprocess_fn,
          eval_preprocess_fn=emnist_task.datasets.eval_preprocess_fn),
      emnist_task.model_fn)
  with pytest.raises(checks.ArgumentError,
                     match='`baseline_task` must have federated test data'):
    baseline_tasks.from_baseline_task(central)


def _evaluation(task, model=None):
  return personalization_eval.build_personalized_evaluation(
      model or task.model_fn, adaptation_steps=(1, 2),
      ignore_label=task.ignore_label)


@pytest.mark.parametrize('name', ['emnist', 'shakespeare'])
def test_evaluate_population_takes_the_baseline_task(name, request):
  baseline = request.getfixturevalue(f'{name}_task')
  task = baseline_tasks.from_baseline_task(baseline)
  evaluation = _evaluation(task)
  weights = process_arguments.initial_model_weights_computation(
      baseline.model_fn)()
  result = population_eval.evaluate_population(
      evaluation, weights, baseline, alpha=0.05, adapt_batch_size=2)
  assert result.client_ids == list(task.test.client_ids)
  assert (result.num_adaptation_steps == 2).all()
  summary = result.summary()
  assert summary['num_clients'] == len(task.client_ids)
  for k in (0, 1, 2):
    assert all(math.isfinite(v) for v in summary[f'step_{k}'].values())
  # Exactly the evaluation of the adapted task's splits (same batches), and
  # of the task's BaselineTaskDatasets.
  same = population_eval.evaluate_population(
      evaluation, weights, task.train, task.test, alpha=0.05,
      adapt_batch_size=2)
  by_datasets = population_eval.evaluate_task(
      evaluation, weights, baseline.datasets, alpha=0.05,
      adapt_batch_size=2)['seen']
  for other in (same, by_datasets):
    for k in (0, 1, 2):
      np.testing.assert_allclose(other.loss[k], result.loss[k], rtol=1e-6)
      np.testing.assert_allclose(other.accuracy[k], result.accuracy[k])
  # The raw ClientData (no preprocessing) is refused in one line.
  with pytest.raises(checks.ArgumentError,
                     match='raw ClientData needs its preprocessing') as e:
    population_eval.evaluate_population(
        evaluation, weights, baseline.datasets.train_data,
        baseline.datasets.test_data, alpha=0.05)
  assert '\n' not in str(e.value)
  with pytest.raises(checks.ArgumentError, match='`test_data` must be omitted'):
    population_eval.evaluate_population(evaluation, weights, baseline,
                                        task.test, alpha=0.05)


def _round(task, model, clients, local_steps=1):
  """One Per-FedAvg (HF) round of `model` on `task`'s `clients` (batches of
  2): checks that the weights moved and stayed finite; the round's metrics."""
  process = perfed_tff.build_per_fedavg(
      model, variant='hf', alpha=0.01, beta=0.05, local_steps=local_steps)
  state = process.initialize()
  before = [np.array(w) for w in process.get_model_weights(state).trainable]
  data = [task_lib.client_batches(
      task.train.create_tf_dataset_for_client(cid), batch_size=2,
      num_batches=3 * local_steps, seed=task_lib.derive_seed(0, 1, cid))
          for cid in clients]
  output = process.next(state, data)
  after = [np.array(w)
           for w in process.get_model_weights(output.state).trainable]
  assert all(np.isfinite(w).all() for w in after)
  assert any(not np.allclose(a, b) for a, b in zip(after, before))
  return output.metrics['client_work']['train']


def test_per_fedavg_round_on_emnist_task(emnist_task):
  task = baseline_tasks.from_baseline_task(emnist_task)
  # From the task's own model_fn (a VariableModel) ...
  metrics = _round(task, emnist_task.model_fn, EMNIST_IDS[:2])
  assert metrics['num_examples'] == 12 and metrics['num_steps'] == 2
  assert math.isfinite(metrics['loss'])
  assert 'sparse_categorical_accuracy' in metrics
  # TFF's public API gives no Keras model of a baseline task: no
  # FunctionalModel or export, in one line; the training program trains the
  # VariableModel (`processes.per_fedavg_model`).
  for unavailable in (task.functional_model, task.keras_model_fn):
    with pytest.raises(TypeError, match="not available through TFF's public "
                       'API') as e:
      unavailable()
    assert '\n' not in str(e.value)
  from perfed_tff.program import processes  # pylint: disable=g-import-not-at-top
  assert processes.per_fedavg_model(task) is task.model_fn


@pytest.mark.slow
def test_per_fedavg_round_on_shakespeare_task(shakespeare_task):
  task = baseline_tasks.from_baseline_task(shakespeare_task)
  metrics = _round(task, shakespeare_task.model_fn,
                   [CUPID, 'THE_TRAGEDY_OF_KING_LEAR_KENT'])
  assert metrics['num_examples'] == 12 and math.isfinite(metrics['loss'])
  # TFF's masked metrics, at w and (personalized_) at w~.
  assert metrics['num_tokens'] > 0 and 'personalized_accuracy' in metrics


def test_training_program_runs_a_baseline_task(tmp_path, emnist_task):
  task = baseline_tasks.from_baseline_task(emnist_task)
  config = h.training_config(
      tmp_path, algorithm='per_fedavg_hf', rounds=2, clients_per_round=2,
      batch_size=2, eval_every=2, eval_clients=2, checkpoint_every=2)
  result = training_loop.run_training(config, task=task)
  assert result.rounds == 2 and math.isfinite(result.train_loss)
  assert result.eval_metrics['seen/num_clients'] == 2
  assert math.isfinite(result.eval_metrics['seen/step_1/accuracy_mean'])
  assert math.isfinite(result.eval_metrics['seen/step_1/loss_mean'])
