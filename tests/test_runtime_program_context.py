"""`tff.learning.programs.train_model` runs Per-FedAvg in the project's
execution context entered as a `tff.program.NativeFederatedContext`, with
the project's CheckpointManager (wrapped in TrainModelStateManager, or as it
is); the result equals a plain loop."""

import asyncio

import numpy as np
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib
from perfed_tff.program import checkpointing
from perfed_tff.runtime import supervision
from perfed_tff.runtime import program_context

ROUNDS, CLIENTS, BATCH, TAU = 3, 2, 8, 2


def _process_source_and_checkpoints(algorithm, tmp_path):
  """(process, RoundDataSource, CheckpointManager) of a small synthetic run
  of `algorithm`."""
  task = synthetic.load_synthetic(num_users=6, seed=0)
  process = algorithms.build_algorithm(
      algorithm, task.model_fn, alpha=0.05, beta=0.05, local_steps=TAU)
  source = program_context.RoundDataSource(
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


def test_train_model_three_rounds_with_owned_worker_and_checkpoints(
    tmp_path, tff_context):
  process, source, manager = _process_source_and_checkpoints(
      'per_fedavg_hf', tmp_path)
  states = program_context.TrainModelStateManager(manager, source)
  metrics = tff.program.MemoryReleaseManager()
  models = tff.program.MemoryReleaseManager()

  def run():
    asyncio.run(tff.learning.programs.train_model(
        train_process=process, train_data_source=source,
        train_per_round_clients=CLIENTS, train_total_rounds=ROUNDS,
        program_state_manager=states, model_output_manager=models,
        train_metrics_manager=metrics, evaluation_manager=None,
        evaluation_periodicity=1))

  with program_context.ProgramContext(tff_context) as ctx:
    assert tff.framework.get_context_stack().current is ctx.federated_context
    run()
    run()   # Everything done: resumes from round 3 and trains no more.
  # The session's synchronous context is back.
  assert tff.framework.get_context_stack().current is tff_context.context
  assert manager.latest_round() == ROUNDS
  released = metrics.values()
  assert sorted(released) == [1, 2, 3]
  # train_model releases metrics['client_work']['train'] as 'model_metrics'.
  train = released[ROUNDS]['model_metrics']
  assert 'sparse_categorical_accuracy' in train
  assert 'personalized_sparse_categorical_accuracy' in train

  # The same rounds in a plain loop in the synchronous context.
  want = _plain_loop_weights(process, 'per_fedavg_hf')
  saved = supervision.run_sync(states.load(
      ROUNDS, program_context_state(process, source)))
  assert saved.round_number == ROUNDS
  assert saved.data_iterator.round_num == ROUNDS + 1
  got = process.get_model_weights(saved.state).trainable
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6)
  released_weights = models.values()
  assert released_weights, 'train_model released the final model'


def test_checkpoint_manager_is_train_models_state_manager_as_it_is(
    tmp_path, tff_context):
  """CheckpointManager itself stores train_model's program state: a second
  call resumes the model, round and data iterator and trains the rest."""
  process, source, manager = _process_source_and_checkpoints(
      'per_fedavg_fo', tmp_path)

  def run(rounds):
    metrics = tff.program.MemoryReleaseManager()
    asyncio.run(tff.learning.programs.train_model(
        train_process=process, train_data_source=source,
        train_per_round_clients=CLIENTS, train_total_rounds=rounds,
        program_state_manager=manager,
        model_output_manager=tff.program.MemoryReleaseManager(),
        train_metrics_manager=metrics, evaluation_manager=None,
        evaluation_periodicity=1))
    return sorted(metrics.values())

  with program_context.ProgramContext(tff_context):
    assert run(ROUNDS - 1) == list(range(1, ROUNDS))
    assert run(ROUNDS) == [ROUNDS]   # Resumed: only the last round trains.
  assert manager.latest_round() == ROUNDS
  saved = supervision.run_sync(manager.load(
      ROUNDS, program_context_state(process, source)))
  assert saved.round_number == ROUNDS
  assert saved.data_iterator.round_num == ROUNDS + 1
  assert saved.next_evaluation_timestamp_seconds is None
  for g, w in zip(process.get_model_weights(saved.state).trainable,
                  _plain_loop_weights(process, 'per_fedavg_fo')):
    np.testing.assert_allclose(g, w, atol=1e-6)


def program_context_state(process, source):
  from tensorflow_federated.python.learning.programs import training_program_logic  # pylint: disable=g-import-not-at-top
  return training_program_logic.ProgramState(
      process.initialize(), 0, None, source.iterator())
