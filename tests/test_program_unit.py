"""Training program pieces in-process: validation, checkpoints, CSV resume,
non-finite loss, exact resume (using the session's TFF context)."""

import collections
import csv
import dataclasses
import os
import types

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff import checkpointing
from perfed_tff import flags_validation as fv
from perfed_tff import training_program as tp
from perfed_tff.data import synthetic


def _config(tmp_path, **kw):
  base = dict(algorithm='per_fedavg_fo', dataset='synthetic', rounds=4,
              clients_per_round=3, local_steps=1, batch_size=8, seed=1,
              root_output_dir=str(tmp_path), checkpoint_every=2,
              eval_every=0, progress=False)
  base.update(kw)
  return tp.validate(tp.TrainingConfig(**base))


@pytest.fixture(scope='module')
def small_task():
  return synthetic.load_synthetic(num_users=8, seed=1,
                                  max_examples_per_user=60)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize('field,value,flag_text', [
    ('alpha', 0.0, '--alpha: must be a finite number > 0'),
    ('beta', -1.0, '--beta: must be a finite number > 0'),
    ('delta', float('nan'), '--delta: must be a finite number > 0'),
    ('rounds', 0, '--rounds: must be an integer >= 1'),
    ('clients_per_round', 0, '--clients_per_round: must be an integer >= 1'),
    ('local_steps', 0, '--local_steps: must be an integer >= 1'),
    ('batch_size', 0, '--batch_size: must be an integer >= 1'),
    ('algorithm', 'sgd', "--algorithm: must be one of ['fedavg', "),
    ('dataset', 'mnist', "--dataset: must be one of ["),
    ('client_weighting', 'x', "--client_weighting: must be one of"),
    ('graph_optimization', 'xla', "--graph_optimization: must be one of"),
    ('workers', 'localhost', '--workers: must be a comma-separated list'),
    ('cache_dir', '/nonexistent/dir', '--cache_dir: directory'),
    ('dataset_options', {'bogus': 1}, '--dataset_options: unknown option'),
])
def test_validate_rejects(tmp_path, field, value, flag_text):
  with pytest.raises(fv.UsageError) as e:
    tp.validate(tp.TrainingConfig(root_output_dir=str(tmp_path),
                                  **{field: value}))
  assert str(e.value).startswith(flag_text), str(e.value)
  assert e.value.flag == field
  assert '\n' not in str(e.value)


def test_validate_output_dir_not_a_directory(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(fv.UsageError, match='--root_output_dir: .* not a dir'):
    tp.validate(tp.TrainingConfig(root_output_dir=str(blocker / 'out')))


def test_validate_normalizes(tmp_path):
  c = tp.validate(tp.TrainingConfig(root_output_dir=str(tmp_path / 'new'),
                                    workers='a:1, b:2',
                                    dataset_options='num_users=12'))
  assert c.workers == ('a:1', 'b:2')
  assert c.dataset_options == {'num_users': 12}


def test_population_check(tmp_path, small_task):
  c = _config(tmp_path, clients_per_round=9)
  with pytest.raises(fv.UsageError,
                     match=r'--clients_per_round: must be between 1 and the '
                     r"population of 'synthetic' \(8 clients\), got 9"):
    tp.check_population(c, small_task)


# --------------------------------------------------------------- checkpoints

def _state(shape=(3, 2)):
  return collections.OrderedDict(
      weights=[np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
               np.zeros(2, np.float32)],
      empty=(), lr=np.float32(0.5))


def test_checkpoint_round_trip_and_checks(tmp_path):
  mgr = checkpointing.CheckpointManager(str(tmp_path), keep_total=2)
  assert mgr.load_latest(_state(), {'a': 1}) is None
  for r in (2, 4, 6):
    mgr.save(_state(), r, {'a': 1})
  assert mgr.versions() == [4, 6]
  state, r = mgr.load_latest(_state(), {'a': 1})
  assert r == 6
  np.testing.assert_array_equal(state['weights'][0], _state()['weights'][0])
  assert state['lr'] == np.float32(0.5) and state['empty'] == ()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"different run: a=1 \(this run: 2\)"):
    mgr.load_latest(_state(), {'a': 2})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'does not fit this model: .*float32\(3, 2\).*'
                     r'needs .*float32\(4, 2\)'):
    mgr.load_latest(_state((4, 2)), {'a': 1})


def test_partial_saves_are_removed(tmp_path):
  (tmp_path / 'program_state_4_temp1234').mkdir()
  mgr = checkpointing.CheckpointManager(str(tmp_path))
  assert os.listdir(tmp_path) == [] and mgr.latest_round() is None


def test_corrupt_checkpoint_is_reported_and_untouched(tmp_path):
  mgr = checkpointing.CheckpointManager(str(tmp_path))
  mgr.save(_state(), 2, {})
  bad = tmp_path / 'program_state_4'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'garbage')
  with pytest.raises(checkpointing.CheckpointError,
                     match='program_state_4 is corrupt or unreadable'):
    mgr.load_latest(_state(), {})
  assert (bad / 'saved_model.pb').read_bytes() == b'garbage'


def test_truncate_csv(tmp_path):
  path = tmp_path / 'm.csv'
  path.write_text('round,loss\n1,0.5\n2,0.4\n3,0.3\n')
  tp.truncate_csv(str(path), 2)
  with open(path) as f:
    assert [r['round'] for r in csv.DictReader(f)] == ['1', '2']


def test_flatten_metrics():
  m = collections.OrderedDict(
      distributor=(), client_work=collections.OrderedDict(
          train=collections.OrderedDict(loss=np.float32(1.5), n=np.int64(3))))
  assert tp.flatten_metrics(m) == {'client_work/train/loss': 1.5,
                                   'client_work/train/n': 3}


# ---------------------------------------------------- program with a stub

class _StubProcess:
  """Counts rounds; the loss is NaN at `nan_round`."""

  def __init__(self, nan_round=None):
    self.nan_round = nan_round

  def initialize(self):
    return collections.OrderedDict(w=np.zeros(3, np.float32),
                                   count=np.int64(0))

  def next(self, state, data):
    assert len(data) == 3
    r = int(state['count']) + 1
    loss = float('nan') if r == self.nan_round else 1.0 / r
    new = collections.OrderedDict(w=state['w'] + 1.0, count=np.int64(r))
    metrics = collections.OrderedDict(client_work=collections.OrderedDict(
        train=collections.OrderedDict(loss=np.float32(loss))))
    return types.SimpleNamespace(state=new, metrics=metrics)

  def get_model_weights(self, state):
    return tff.learning.models.ModelWeights(trainable=[state['w']],
                                            non_trainable=[])


def _rows(path):
  with open(path) as f:
    return [int(r['round']) for r in csv.DictReader(f)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_task):
  config = _config(tmp_path, rounds=6)
  with pytest.raises(tp.NonFiniteLossError,
                     match=r'loss is nan at round 5; stopping \(the last good '
                     r'checkpoint \(round 4\)'):
    tp.run_training(config, task=small_task, process=_StubProcess(5))
  paths = tp.output_paths(config)
  assert checkpointing.CheckpointManager(paths['checkpoints']).versions() == [2, 4]
  assert not os.path.exists(paths['final_model'])
  # The same run without the fault resumes from round 4: one row per round.
  result = tp.run_training(config, task=small_task, process=_StubProcess())
  assert result.resumed_from == 4
  assert _rows(paths['train_csv']) == [1, 2, 3, 4, 5, 6]
  w = tp.load_model_weights(paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 6.0))
  # Rerunning a finished run changes nothing.
  again = tp.run_training(config, task=small_task, process=_StubProcess())
  assert again.resumed_from == 6 and _rows(paths['train_csv']) == list(range(1, 7))


def test_rounds_below_checkpoint_is_a_usage_error(tmp_path, small_task):
  tp.run_training(_config(tmp_path, rounds=4), task=small_task,
                  process=_StubProcess())
  with pytest.raises(fv.UsageError, match='--rounds: must be >= the round'):
    tp.run_training(_config(tmp_path, rounds=2), task=small_task,
                    process=_StubProcess())


def test_changed_settings_refuse_to_resume(tmp_path, small_task):
  tp.run_training(_config(tmp_path, rounds=2), task=small_task,
                  process=_StubProcess())
  with pytest.raises(checkpointing.CheckpointError, match='beta=0.05'):
    tp.run_training(_config(tmp_path, rounds=4, beta=0.1), task=small_task,
                    process=_StubProcess())


# ------------------------------------------- real process, session context

def test_resume_is_exact_in_process(tmp_path, small_task):
  """2 rounds, then resume to 4 == 4 rounds at once (with evaluation)."""
  kw = dict(rounds=4, eval_every=2, eval_clients=3)
  full = tp.run_training(_config(tmp_path / 'full', **kw), task=small_task)
  tp.run_training(_config(tmp_path / 'split', **dict(kw, rounds=2)),
                  task=small_task)
  split = tp.run_training(_config(tmp_path / 'split', **kw), task=small_task)
  assert split.resumed_from == 2
  a = tp.load_model_weights(full.paths['final_model'])
  b = tp.load_model_weights(split.paths['final_model'])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
  assert _rows(split.paths['train_csv']) == [1, 2, 3, 4]
  assert _rows(split.paths['eval_csv']) == [2, 4]
  assert 'seen/step_1/accuracy_mean' in split.eval_metrics
  assert os.listdir(split.paths['tensorboard'])  # Event files written.
  assert 'client_work/train/num_non_finite_updates' in split.train_metrics
  assert split.eval_metrics == pytest.approx(full.eval_metrics)
  text = tp.format_comparison([full, split])
  assert 'personalized accuracy' in text.splitlines()[0]


def test_non_finite_client_updates_are_rejected_and_counted(tmp_path):
  """One client's data holds NaN: its update is dropped, counted in the
  metrics CSV, and the run goes on with finite weights."""
  rng = np.random.default_rng(0)
  arrays = {f'c{i}': collections.OrderedDict(
      x=rng.normal(size=(16, synthetic.INPUT_DIM)).astype(np.float32),
      y=rng.integers(0, 10, 16).astype(np.int32)) for i in range(3)}
  arrays['c1']['x'][:] = np.nan
  data = tff.simulation.datasets.TestClientData(arrays)
  base = synthetic.load_synthetic(num_users=2, seed=0)
  task = dataclasses.replace(base, name='nan', train=data, test=data)
  config = _config(tmp_path, rounds=2, clients_per_round=3)
  result = tp.run_training(config, task=task)
  with open(result.paths['train_csv']) as f:
    rows = list(csv.DictReader(f))
  assert [int(r['client_work/train/num_non_finite_updates']) for r in rows] == [1, 1]
  assert all(np.isfinite(float(r[tp.TRAIN_LOSS])) for r in rows)
  w = tp.load_model_weights(result.paths['final_model'])
  assert all(np.all(np.isfinite(v)) for v in w.values())
