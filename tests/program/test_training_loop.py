"""The training loop (`perfed_tff/program/training_loop.py`) in-process, with
a stub process and with the real one in the session's TFF context: the
non-finite loss, CSV resume, exact resume, rejected client updates, round
numbering, a running event loop, inner steps."""

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
from perfed_tff.program import event_loop
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import outputs
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.program import training_loop as tp
from tests import tff_helpers as h

run_sync = event_loop.run_sync


def _rows(path):
  with open(path) as f:
    return [int(r['round']) for r in csv.DictReader(f)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_task):
  config = h.training_config(tmp_path, rounds=6)
  with pytest.raises(tp.NonFiniteLossError,
                     match=r'loss is nan at round 5; stopping \(the last good '
                     r'checkpoint is .*program_state_4\)'):
    tp.run_training(config, task=small_task, process=h.StubProcess(5))
  paths = outputs.output_paths(config)
  assert run_sync(checkpointing.CheckpointManager(
      paths['checkpoints'], metadata={}).get_versions()) == [0, 2, 4]
  assert not os.path.exists(paths['final_model'])
  # The same run without the fault resumes from round 4: one row per round.
  result = tp.run_training(config, task=small_task, process=h.StubProcess())
  assert result.resumed_from == 4
  assert _rows(paths['train_csv']) == [1, 2, 3, 4, 5, 6]
  w = metrics_lib.load_model_weights(paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 6.0))
  # Rerunning a finished run changes nothing.
  again = tp.run_training(config, task=small_task, process=h.StubProcess())
  assert again.resumed_from == 6 and _rows(paths['train_csv']) == list(range(1, 7))


def test_rounds_below_checkpoint_is_a_usage_error(tmp_path, small_task):
  tp.run_training(h.training_config(tmp_path, rounds=4), task=small_task,
                  process=h.StubProcess())
  with pytest.raises(checks.ArgumentError, match='`rounds` must be >= the round'):
    tp.run_training(h.training_config(tmp_path, rounds=2), task=small_task,
                    process=h.StubProcess())


def test_changed_settings_refuse_to_resume(tmp_path, small_task):
  tp.run_training(h.training_config(tmp_path, rounds=2), task=small_task,
                  process=h.StubProcess())
  with pytest.raises(checkpointing.CheckpointError, match='beta=0.05'):
    tp.run_training(h.training_config(tmp_path, rounds=4, beta=0.1),
                    task=small_task, process=h.StubProcess())


def test_resume_is_exact_in_process(tmp_path, small_task):
  """2 rounds, then resume to 4 == 4 rounds at once (with evaluation)."""
  kw = dict(rounds=4, eval_every=2, eval_clients=3)
  full = tp.run_training(h.training_config(tmp_path / 'full', **kw),
                         task=small_task)
  tp.run_training(h.training_config(tmp_path / 'split', **dict(kw, rounds=2)),
                  task=small_task)
  split = tp.run_training(h.training_config(tmp_path / 'split', **kw),
                          task=small_task)
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
  config = h.training_config(tmp_path, rounds=2, clients_per_round=3)
  result = tp.run_training(config, task=task)
  with open(result.paths['train_csv']) as f:
    rows = list(csv.DictReader(f))
  assert [int(r['client_work/train/num_non_finite_updates']) for r in rows] == [1, 1]
  assert all(np.isfinite(float(r[metrics_lib.TRAIN_LOSS])) for r in rows)
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  assert all(np.all(np.isfinite(v)) for v in w.values())


def test_rounds_are_numbered_from_one_with_the_initial_model_at_zero(
    tmp_path, small_task):
  result = tp.run_training(h.training_config(tmp_path, rounds=3, eval_every=2,
                                             eval_clients=2), task=small_task)
  assert _rows(result.paths['train_csv']) == [1, 2, 3]
  assert _rows(result.paths['eval_csv']) == [0, 2, 3]  # 3: the end


def test_runs_inside_a_running_event_loop_like_jupyter(tmp_path, small_task):
  """TFF's loop calls get_event_loop().run_until_complete, which fails in a
  running loop (a notebook); the program then runs it in a helper thread."""
  import asyncio  # pylint: disable=g-import-not-at-top

  async def notebook_cell():
    return tp.run_training(h.training_config(tmp_path, rounds=2),
                           task=small_task)

  result = asyncio.run(notebook_cell())
  assert _rows(result.paths['train_csv']) == [1, 2]


def test_inner_steps_reach_the_process_and_the_batch_stream(tmp_path,
                                                            small_task):
  config = h.training_config(tmp_path, algorithm='per_fedavg_hf',
                             inner_steps=2, local_steps=1)
  _, data = round_data.round_client_data(config, small_task, 1)
  assert len(list(data[0])) == 5          # 2 nu + 1 batches per local step
  fedavg = dataclasses.replace(config, algorithm='fedavg')
  assert len(list(round_data.round_client_data(fedavg, small_task, 1)[1][0])) == 1
  processes.build_process(fedavg, small_task)    # FedAvg ignores nu
  result = tp.run_training(dataclasses.replace(config, rounds=1),
                           task=small_task)
  assert result.train_metrics['client_work/train/num_steps'] >= 1
