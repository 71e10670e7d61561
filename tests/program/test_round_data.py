"""A run's task and round data (`perfed_tff/program/round_data.py`): the
task a config loads, and `RoundDataSource`, with which
`tff.learning.programs.train_model` runs Per-FedAvg in TFF's own program
context (`tff.program.NativeFederatedContext` over TFF's async C++ context)
with the project's CheckpointManager as its program state manager: the
result equals a plain loop, and a second call resumes."""

import asyncio
import gc

import numpy as np
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib
from perfed_tff.program import checkpointing
from perfed_tff.program import event_loop
from perfed_tff.program import round_data
from tests import tff_helpers as h

ROUNDS, CLIENTS, BATCH, TAU = 3, 2, 8, 2


def _process_source_and_checkpoints(algorithm, tmp_path):
  """(process, RoundDataSource, CheckpointManager) of a small synthetic run
  of `algorithm`."""
  task = synthetic.load_synthetic(num_users=6, seed=0)
  process = algorithms.build_algorithm(
      algorithm, task.model_fn, alpha=0.05, beta=0.05, local_steps=TAU)
  source = round_data.RoundDataSource(
      task, clients_per_round=CLIENTS,
      num_batches=algorithms.batches_per_round(algorithm, TAU),
      batch_size=BATCH, seed=0)
  manager = checkpointing.CheckpointManager(
      str(tmp_path / 'checkpoints'), metadata={'algorithm': algorithm},
      keep_total=5)
  return process, source, manager


def _plain_loop_weights(process, algorithm):
  """Trainable weights after ROUNDS rounds of a plain loop over the same
  clients and batches (the synchronous context)."""
  task = synthetic.load_synthetic(num_users=6, seed=0)
  state = process.initialize()
  for r in range(1, ROUNDS + 1):
    _, data = task_lib.round_client_data(
        task, clients_per_round=CLIENTS,
        num_batches=algorithms.batches_per_round(algorithm, TAU),
        batch_size=BATCH, seed=0, round_num=r)
    state = process.next(state, data).state
  return process.get_model_weights(state).trainable


def _program_state(process, source):
  return tff.learning.programs.ProgramState(
      process.initialize(), 0, None, source.iterator())


def test_train_model_in_tffs_program_context_with_the_checkpoint_manager(
    tmp_path):
  process, source, manager = _process_source_and_checkpoints(
      'per_fedavg_hf', tmp_path)

  def run(rounds):
    metrics = tff.program.MemoryReleaseManager()
    models = tff.program.MemoryReleaseManager()
    asyncio.run(tff.learning.programs.train_model(
        train_process=process, train_data_source=source,
        train_per_round_clients=CLIENTS, train_total_rounds=rounds,
        program_state_manager=manager, model_output_manager=models,
        train_metrics_manager=metrics, evaluation_manager=None,
        evaluation_periodicity=1))
    return metrics.values(), models.values()

  stack = tff.framework.get_context_stack()
  program_context = tff.program.NativeFederatedContext(
      tff.backends.native.create_async_local_cpp_execution_context())
  with stack.install(program_context):
    released, _ = run(ROUNDS - 1)
    assert sorted(released) == list(range(1, ROUNDS))
    released, models = run(ROUNDS)   # Resumed: only the last round trains.
    assert sorted(released) == [ROUNDS]
    assert models, 'train_model released the final model'
  del program_context
  gc.collect()  # Its worker stops with it.
  # train_model releases metrics['client_work']['train'] as 'model_metrics'.
  train = released[ROUNDS]['model_metrics']
  assert 'sparse_categorical_accuracy' in train
  assert 'personalized_sparse_categorical_accuracy' in train
  assert manager.latest_round() == ROUNDS
  saved = event_loop.run_sync(manager.load(
      ROUNDS, _program_state(process, source)))
  assert saved.round_number == ROUNDS
  assert saved.data_iterator.round_num == ROUNDS + 1
  assert saved.next_evaluation_timestamp_seconds is None
  # The same rounds in a plain loop in the synchronous context.
  for g, w in zip(process.get_model_weights(saved.state).trainable,
                  _plain_loop_weights(process, 'per_fedavg_hf')):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_the_rounds_of_a_config_are_its_seeds(tmp_path):
  config = h.training_config(tmp_path, algorithm='per_fedavg_hf',
                             dataset_options='num_users=8')
  task = round_data.load_task(config)
  assert round_data.loaded_for(task, config)
  assert not round_data.loaded_for(task, h.training_config(
      tmp_path, algorithm='per_fedavg_hf', dataset_options='num_users=8',
      seed=2))
  ids, data = round_data.round_client_data(config, task, 2)
  again_ids, again = round_data.round_client_data(config, task, 2)
  assert ids == again_ids and len(ids) == config.clients_per_round
  for a, b in zip(data, again):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x['x'], y['x'])
  assert round_data.batches_per_round(config) == 3 * config.local_steps
