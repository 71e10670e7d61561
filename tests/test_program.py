"""Training program pieces in-process: validation, checkpoints, CSV resume,
non-finite loss, exact resume (using the session's TFF context)."""

import collections
import csv
import dataclasses
import os

import numpy as np
import pytest
import tensorflow_federated as tff

from experiments import train as train_binary
from perfed_tff import checks
from perfed_tff.data import synthetic
from perfed_tff.program import checkpointing
from perfed_tff.runtime import supervision
from perfed_tff.program import config as config_lib
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import population_eval
from perfed_tff.program import training_loop as tp

run_sync = supervision.run_sync


def _config(tmp_path, **kw):
  base = dict(algorithm='per_fedavg_fo', dataset='synthetic', rounds=4,
              clients_per_round=3, local_steps=1, batch_size=8, seed=1,
              root_output_dir=str(tmp_path), checkpoint_every=2,
              eval_every=0, progress=False)
  base.update(kw)
  return config_lib.validate(tp.TrainingConfig(**base))


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
  with pytest.raises(checks.ArgumentError) as e:
    config_lib.validate(tp.TrainingConfig(root_output_dir=str(tmp_path),
                                          **{field: value}))
  assert e.value.flag_message.startswith(flag_text), e.value.flag_message
  assert e.value.name == field
  assert '\n' not in str(e.value)


def test_validate_output_dir_not_a_directory(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(checks.ArgumentError, match='`root_output_dir` .* not a dir'):
    config_lib.validate(tp.TrainingConfig(root_output_dir=str(blocker / 'out')))


def test_validate_normalizes(tmp_path):
  c = config_lib.validate(tp.TrainingConfig(root_output_dir=str(tmp_path / 'new'),
                                    workers='a:1, b:2',
                                    dataset_options='num_users=12'))
  assert c.workers == ('a:1', 'b:2')
  assert c.dataset_options == {'num_users': 12}


def test_population_check(tmp_path, small_task):
  c = _config(tmp_path, clients_per_round=9)
  with pytest.raises(checks.ArgumentError,
                     match=r'`clients_per_round` must be between 1 and the '
                     r"population of 'synthetic' \(8 clients\), got 9"):
    config_lib.check_population(c, len(small_task.client_ids))


# --------------------------------------------------------------- checkpoints

def _state(shape=(3, 2)):
  return collections.OrderedDict(
      weights=[np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
               np.zeros(2, np.float32)],
      empty=(), lr=np.float32(0.5))


def _manager(path, metadata=None, **kw):
  return checkpointing.CheckpointManager(str(path), metadata=metadata or {},
                                         **kw)


def test_checkpoint_manager_is_a_tff_program_state_manager(tmp_path):
  assert isinstance(_manager(tmp_path), tff.program.ProgramStateManager)


def test_checkpoint_round_trip_and_checks(tmp_path):
  mgr = _manager(tmp_path, {'a': 1}, keep_total=2)
  assert run_sync(mgr.load_latest(_state())) == (None, 0)
  for r in (2, 4, 6):
    run_sync(mgr.save(_state(), r))
  assert run_sync(mgr.get_versions()) == [4, 6]
  state, r = run_sync(mgr.load_latest(_state()))
  assert r == 6
  np.testing.assert_array_equal(state['weights'][0], _state()['weights'][0])
  assert state['lr'] == np.float32(0.5) and state['empty'] == ()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"different run: a=1 \(this run: 2\)"):
    run_sync(_manager(tmp_path, {'a': 2}).load_latest(_state()))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'does not fit this model: .*float32\(3, 2\).*'
                     r'needs .*float32\(4, 2\)'):
    run_sync(mgr.load_latest(_state((4, 2))))


def test_partial_saves_are_removed(tmp_path):
  (tmp_path / 'program_state_4_temp1234').mkdir()
  mgr = _manager(tmp_path)
  assert os.listdir(tmp_path) == [] and mgr.latest_round() is None


def test_corrupt_checkpoint_is_reported_and_untouched(tmp_path):
  mgr = _manager(tmp_path)
  run_sync(mgr.save(_state(), 2))
  bad = tmp_path / 'program_state_4'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'garbage')
  with pytest.raises(checkpointing.CheckpointError,
                     match='program_state_4 is corrupt or unreadable'):
    run_sync(mgr.load_latest(_state()))
  assert (bad / 'saved_model.pb').read_bytes() == b'garbage'


def test_truncate_csv(tmp_path):
  path = tmp_path / 'm.csv'
  path.write_text('round,loss\n1,0.5\n2,0.4\n3,0.3\n')
  metrics_lib.truncate_csv(str(path), 2)
  with open(path) as f:
    assert [r['round'] for r in csv.DictReader(f)] == ['1', '2']


def test_flatten_metrics():
  m = collections.OrderedDict(
      distributor=(), client_work=collections.OrderedDict(
          train=collections.OrderedDict(loss=np.float32(1.5), n=np.int64(3))))
  assert metrics_lib.flatten_metrics(m) == {'client_work/train/loss': 1.5,
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
    return tff.learning.templates.LearningProcessOutput(new, metrics)

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
                     r'checkpoint is .*program_state_4\)'):
    tp.run_training(config, task=small_task, process=_StubProcess(5))
  paths = tp.output_paths(config)
  assert run_sync(_manager(paths['checkpoints']).get_versions()) == [0, 2, 4]
  assert not os.path.exists(paths['final_model'])
  # The same run without the fault resumes from round 4: one row per round.
  result = tp.run_training(config, task=small_task, process=_StubProcess())
  assert result.resumed_from == 4
  assert _rows(paths['train_csv']) == [1, 2, 3, 4, 5, 6]
  w = metrics_lib.load_model_weights(paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 6.0))
  # Rerunning a finished run changes nothing.
  again = tp.run_training(config, task=small_task, process=_StubProcess())
  assert again.resumed_from == 6 and _rows(paths['train_csv']) == list(range(1, 7))


def test_rounds_below_checkpoint_is_a_usage_error(tmp_path, small_task):
  tp.run_training(_config(tmp_path, rounds=4), task=small_task,
                  process=_StubProcess())
  with pytest.raises(checks.ArgumentError, match='`rounds` must be >= the round'):
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
  a = metrics_lib.load_model_weights(full.paths['final_model'])
  b = metrics_lib.load_model_weights(split.paths['final_model'])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
  assert _rows(split.paths['train_csv']) == [1, 2, 3, 4]
  assert _rows(split.paths['eval_csv']) == [0, 2, 4]  # round 0: initial model
  assert 'seen/step_1/accuracy_mean' in split.eval_metrics
  assert os.listdir(split.paths['tensorboard'])  # Event files written.
  assert 'client_work/train/num_non_finite_updates' in split.train_metrics
  timing = metrics_lib.EVAL_TIME_KEY
  assert ({k: v for k, v in split.eval_metrics.items() if k != timing}
          == pytest.approx({k: v for k, v in full.eval_metrics.items()
                            if k != timing}))
  text = train_binary.format_comparison([full, split])
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
  assert all(np.isfinite(float(r[metrics_lib.TRAIN_LOSS])) for r in rows)
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  assert all(np.all(np.isfinite(v)) for v in w.values())


def test_rounds_are_numbered_from_one_with_the_initial_model_at_zero(
    tmp_path, small_task):
  result = tp.run_training(_config(tmp_path, rounds=3, eval_every=2,
                                   eval_clients=2), task=small_task)
  assert _rows(result.paths['train_csv']) == [1, 2, 3]
  assert _rows(result.paths['eval_csv']) == [0, 2, 3]  # 3: the end


def test_eval_client_sampler_is_seeded_and_capped():
  ids = [f'c{i}' for i in range(20)]
  a = population_eval.sample_eval_clients(ids, 5, 0, 'seen')
  assert a == population_eval.sample_eval_clients(ids, 5, 0, 'seen')
  assert len(a) == 5 and a == sorted(a) and set(a) <= set(ids)
  assert a != population_eval.sample_eval_clients(ids, 5, 0, 'unseen')
  assert population_eval.sample_eval_clients(ids, 0, 0, 'seen') == ids
  assert population_eval.sample_eval_clients(ids, 50, 0, 'seen') == ids


def test_runs_inside_a_running_event_loop_like_jupyter(tmp_path, small_task):
  """TFF's loop calls get_event_loop().run_until_complete, which fails in a
  running loop (a notebook); the program then runs it in a helper thread."""
  import asyncio  # pylint: disable=g-import-not-at-top

  async def notebook_cell():
    return tp.run_training(_config(tmp_path, rounds=2), task=small_task)

  result = asyncio.run(notebook_cell())
  assert _rows(result.paths['train_csv']) == [1, 2]


def test_inner_steps_reach_the_process_and_the_batch_stream(tmp_path,
                                                            small_task):
  config = _config(tmp_path, algorithm='per_fedavg_hf', inner_steps=2,
                   local_steps=1)
  _, data = tp.round_client_data(config, small_task, 1)
  assert len(list(data[0])) == 5          # 2 nu + 1 batches per local step
  fedavg = dataclasses.replace(config, algorithm='fedavg')
  assert len(list(tp.round_client_data(fedavg, small_task, 1)[1][0])) == 1
  tp.build_process(fedavg, small_task)    # FedAvg ignores nu
  result = tp.run_training(dataclasses.replace(config, rounds=1),
                           task=small_task)
  assert result.train_metrics['client_work/train/num_steps'] >= 1
