"""The training program: TFF's training loop with checkpoints, exact resume,
metrics, evaluation and a progress bar.

`run_training(config)` runs `tff.simulation.run_training_process` (rounds
numbered from 1; round 0 is the initial model) with

* `perfed_tff.program.checkpointing.CheckpointManager` (a
  `tff.program.FileProgramStateManager`) as its program state manager: a
  checkpoint at round 0, every `checkpoint_every` rounds and at the end; a new
  start resumes from the latest one under the run's folder
  (`outputs.output_paths`). Client sampling and batch shuffling are pure
  functions of (seed, round) (`round_data`), so a resumed run computes
  exactly what the uninterrupted run would have.
* `perfed_tff.program.metrics.RunReleaseManager` as its metrics manager
  (`metrics/train.csv`, `metrics/eval.csv`, TensorBoard, log lines or a
  progress bar). On resume the CSVs are cut back to the checkpoint's round, so
  every round has exactly one row.
* Personalized evaluation (`perfed_tff.program.population_eval`) of the
  initial model (round 0), every `eval_every` rounds and at the end, at the
  alpha in the process state (`get_hparams`; the run's alpha for FedAvg,
  whose state has none).
* Divergence (`perfed_tff.program.divergence.DivergenceCheck`, asked after
  every round as TFF's `should_discard_round` is): no usable client update
  for several rounds in a row, an exploding or a non-finite loss stops the
  run before that round is checkpointed.
* The run's ring (`perfed_tff.program.launch`): its supervisor (with the
  owned runtime: deadlines, worker health checks, signals; the last
  checkpoint stays resumable), its traced computations kept across runs and
  its rounds in blocks (with the accelerator).

Every algorithm, every binary (`experiments/train.py`, `compare.py`) and the
notebook train through this one function; a comparison is a set of such runs.
It uses the current TFF context (`run(config)` opens the run's own first).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff import personalization_data
from perfed_tff import personalization_eval
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets
from perfed_tff.program import checkpointing
from perfed_tff.program import divergence
from perfed_tff.program import event_loop
from perfed_tff.program import launch
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import outputs
from perfed_tff.program import population_eval
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.program import settings as settings_lib
from perfed_tff.program import supervised_loop

TrainingConfig = settings_lib.TrainingConfig
CheckpointError = checkpointing.CheckpointError
NonFiniteLossError = divergence.NonFiniteLossError
DivergenceError = divergence.DivergenceError


@dataclasses.dataclass
class TrainingResult:
  """What a run did and wrote."""
  algorithm: str
  output_dir: str
  rounds: int
  resumed_from: Optional[int]            # checkpoint round, None if fresh
  train_metrics: dict                    # last round's flat metrics
  eval_metrics: Optional[dict]           # last evaluation (None if none)
  paths: dict                            # name -> path of every output
  seconds: float

  @property
  def train_loss(self) -> float:
    return float(self.train_metrics.get(metrics_lib.TRAIN_LOSS, float('nan')))

  @property
  def personalized_loss(self) -> Optional[float]:
    v = self.train_metrics.get(metrics_lib.PERSONALIZED_LOSS)
    return None if v is None else float(v)


def _built_processes(config: TrainingConfig, task: task_lib.FederatedTask):
  """(the run's process, its `worker_side_process`), traced now."""
  process = processes.build_process(config, task)
  return process, round_data.worker_side_process(config, task, process)


def build_evaluation(config: TrainingConfig, task: task_lib.FederatedTask
                     ) -> personalization_eval.PersonalizedEvaluation:
  """The run's personalized evaluation (its `eval_steps`, of the task's
  model), with its worker-side version for the run's batch sizes, kept
  across runs by the accelerator (`launch.evaluation`)."""
  adapt_batch_size = config.effective_adapt_batch_size
  steps = tuple(config.eval_steps)

  def build():
    evaluation = personalization_eval.build_personalized_evaluation(
        task.model_fn, adaptation_steps=steps, ignore_label=task.ignore_label)
    personalization_data.worker_side_evaluation(
        evaluation, task.test.element_type_structure,
        adapt_batch_size=adapt_batch_size)
    return evaluation

  return launch.evaluation(
      config, task, build, eval_steps=steps,
      adapt_batch_size=adapt_batch_size,
      eval_batch_size=personalization_data.EVAL_BATCH_SIZE,
      test_spec=repr(task.test.element_type_structure))


def build_evaluate_fn(config: TrainingConfig, task: task_lib.FederatedTask
                      ) -> Callable[[Any, float], dict]:
  """The run's `fn(model_weights, alpha) -> nested metrics`: its
  `build_evaluation` on the task's populations, each capped at
  `config.eval_clients` clients (`population_eval.build_evaluate_fn`). It
  depends on the evaluation settings only, not on the algorithm, so the
  runs of a comparison share it."""
  return population_eval.build_evaluate_fn(
      build_evaluation(config, task), task,
      eval_clients=config.eval_clients, seed=config.seed,
      adapt_batch_size=config.effective_adapt_batch_size,
      protocols=config.eval_protocols)


def evaluation_alpha(config: TrainingConfig, process, state) -> float:
  """The alpha a run evaluates its model at: the client work's `alpha`
  hyperparameter in the process state (Per-FedAvg's, which `set_hparams`
  changes), else the run's (FedAvg's state has none)."""
  client_work = process.get_hparams(state).get('client_work', {})
  alpha = client_work.get('alpha') if hasattr(client_work, 'get') else None
  return config.alpha if alpha is None else float(alpha)


def run_training(config: TrainingConfig, *,
                 task: Optional[task_lib.FederatedTask] = None,
                 process=None,
                 evaluate_fn: Optional[Callable[[Any, float], dict]] = None,
                 write: Optional[Callable[[str], None]] = None
                 ) -> TrainingResult:
  """Trains `config.algorithm` to `config.rounds` rounds in the current TFF
  context, resuming from the latest checkpoint of this run if there is one.

  Args:
    config: a validated `TrainingConfig` (see `settings.validate`).
    task: the dataset (default `round_data.load_task(config)`).
    process: the `LearningProcess` (default `processes.build_process`).
    evaluate_fn: `fn(model_weights, alpha) -> nested metrics` (default
      `build_evaluate_fn`; unused with eval_every=0).
    write: where human-readable lines go (default absl logging).

  Raises:
    checks.ArgumentError: clients_per_round above the population, or rounds
      below the checkpoint to resume.
    CheckpointError: the latest readable checkpoint is from another run, or
      no checkpoint is intact (a damaged newer one is set aside with a
      warning and the run resumes from the newest intact one).
    NonFiniteLossError: the global loss became non-finite.
  """
  start_time = time.monotonic()
  write = write or logging.info
  task = task if task is not None else round_data.load_task(config)
  round_data.check_population(config, len(task.client_ids), task)
  outputs.check_output_paths(config)
  with launch.supervisor(config, write=write) as supervisor:
    return _run_training(config, task, process, evaluate_fn, write,
                         supervisor, start_time)


def _truncate_metric_files(paths, max_round: int) -> None:
  """Cuts the run's metric CSVs back to `max_round` (sys.maxsize: only
  checks them).

  Raises:
    CheckpointError: a CSV that is no metrics file (left untouched).
  """
  for key in ('train_csv', 'eval_csv'):
    try:
      metrics_lib.truncate_csv(paths[key], max_round)
    except metrics_lib.MetricsFileError as e:
      raise CheckpointError(
          f'{e}; it was left untouched: repair or remove it, or choose '
          'another `root_output_dir`') from None


def _resume(config, paths, checkpoints, initial_state, write):
  """(state, round) to continue from: the latest checkpoint of this run, or
  (initial_state, -1) for a fresh start. The metric files and TensorBoard
  are cut back to that round, so every round is recorded once."""
  state, start_round = event_loop.run_sync(
      checkpoints.load_latest(initial_state))
  if state is None:
    state, start_round = initial_state, -1
  elif start_round > config.rounds:
    raise checks.ArgumentError(
        'rounds', f'must be >= the round of the checkpoint to resume '
        f'({start_round} in {paths["checkpoints"]}), got {config.rounds}')
  else:
    write(f'{config.algorithm}: resuming from round {start_round} '
          f'({checkpoints.path(start_round)})')
  _truncate_metric_files(paths, start_round)
  # Rounds after the checkpoint are trained again: TensorBoard holds each once.
  metrics_lib.prune_tensorboard(paths['tensorboard'], start_round)
  return state, start_round


def _run_training(config, task, process, evaluate_fn, write, supervisor,
                  start_time) -> TrainingResult:
  """`run_training` under `supervisor`."""
  supervisor.begin('start-up', 'initialization')
  if process is None:
    # Traced once per settings (and kept across runs by the accelerator).
    process, on_worker = launch.training_processes(
        config, task, lambda: _built_processes(config, task))
  else:
    on_worker = round_data.worker_side_process(config, task, process)
  if not config.eval_every:
    evaluate_fn = None
  elif evaluate_fn is None:
    evaluate_fn = build_evaluate_fn(config, task)
  paths = outputs.output_paths(config)
  # Unusable metric files are refused before anything is created or written.
  _truncate_metric_files(paths, sys.maxsize)
  for key in ('run_dir', 'checkpoints', 'tensorboard'):
    os.makedirs(paths[key], exist_ok=True)
  os.makedirs(os.path.dirname(paths['train_csv']), exist_ok=True)

  # Resume (or start) before writing anything else: a checkpoint of another
  # run raises here, with every file left as it was.
  checkpoints = checkpointing.CheckpointManager(
      paths['checkpoints'], metadata=config.resume_metadata(),
      keep_total=config.keep_checkpoints,
      # Its warning (a damaged checkpoint set aside) shows at absl's default
      # verbosity when no `write` was given.
      write=None if write is logging.info else write)
  initial_state = process.initialize()
  state, start_round = _resume(config, paths, checkpoints, initial_state,
                               write)
  resumed_from = None if start_round < 0 else start_round
  supervisor.end()
  outputs.write_settings(config, paths, write=write)
  first_rows = metrics_lib.read_csv(paths['train_csv'])[:1]

  bar = (metrics_lib.progress_bar(config.rounds, max(start_round, 0),
                                  config.algorithm)
         if config.progress else None)
  # Client batches are built on the worker from each client's examples.
  examples = worker_datasets.client_examples(task.train)
  blocks = launch.round_blocks(
      config, process, on_worker,
      round_inputs=lambda r: round_data.round_client_inputs(
          config, task, r, examples)[1])
  release = metrics_lib.RunReleaseManager(
      config.algorithm, train_csv=paths['train_csv'],
      eval_csv=paths['eval_csv'] if evaluate_fn else None,
      tensorboard_dir=paths['tensorboard'], write=write, bar=bar,
      round_seconds=None if blocks is None else blocks.seconds)
  check = divergence.DivergenceCheck(
      config.algorithm, clients_per_round=config.clients_per_round,
      reference_loss=(first_rows[0].get(metrics_lib.TRAIN_LOSS)
                      if first_rows else None),
      hyperparameters=_step_sizes(config),
      last_good_checkpoint=lambda: (
          lambda r: r is not None and checkpoints.path(r))(
              checkpoints.latest_round()))
  managed = supervised_loop.SupervisedCheckpoints(
      checkpoints, supervisor,
      preloaded=None if resumed_from is None else (state, start_round))

  def evaluation_fn(state, round_num):
    # evaluation_selection_fn hands TFF's loop the round as the "data".
    # The phase lasts until the next begins (its release included).
    supervisor.begin(f'evaluation at round {round_num}', 'evaluation')
    return evaluate_fn(process.get_model_weights(state),
                       evaluation_alpha(config, process, state))

  supervised = supervised_loop.SupervisedProcess(
      on_worker, initial_state, supervisor, check, blocks)

  def selection_fn(round_num):
    supervised.begin_round(round_num)
    if blocks is not None:
      return round_num  # The block builds its rounds' inputs.
    if on_worker is process:
      return round_data.round_client_data(config, task, round_num)[1]
    return round_data.round_client_inputs(config, task, round_num,
                                          examples)[1]

  def train():
    return tff.simulation.run_training_process(
        supervised,
        training_selection_fn=selection_fn,
        total_rounds=config.rounds,
        evaluation_fn=evaluation_fn if evaluate_fn else None,
        evaluation_selection_fn=(lambda r: r) if evaluate_fn else None,
        rounds_per_evaluation=config.eval_every or 1,
        program_state_manager=managed,
        rounds_per_saving_program_state=config.checkpoint_every,
        metrics_managers=[release])

  try:
    try:
      state = supervisor.run(train)
    except divergence.DivergenceError as e:
      release.say_stopped_round(supervised.last_metrics, e.round_num)
      raise
    except divergence.NonFiniteLossError as e:
      # The round that stopped the run is recorded; it is not checkpointed.
      event_loop.run_sync(release.release(supervised.last_metrics,
                                          e.round_num))
      raise
    supervisor.check_stop()
    if checkpoints.latest_round() != config.rounds:
      event_loop.run_sync(managed.save(state, config.rounds))
    eval_rows = metrics_lib.read_csv(paths['eval_csv'])
    if evaluate_fn and (not eval_rows or eval_rows[-1]['round']
                        != config.rounds):
      # The end of the run is evaluated even off the eval_every cadence.
      event_loop.run_sync(release.release(
          {'evaluation': evaluation_fn(state, config.rounds)},
          config.rounds))
  finally:
    if bar is not None:
      bar.close()

  if resumed_from != config.rounds or not os.path.exists(
      paths['final_model']):
    metrics_lib.save_model_weights(paths['final_model'],
                                   process.get_model_weights(state),
                                   config.rounds)
  train_rows = metrics_lib.read_csv(paths['train_csv'])
  eval_rows = metrics_lib.read_csv(paths['eval_csv']) if evaluate_fn else []
  paths = dict(paths)
  if not evaluate_fn:
    paths.pop('eval_csv')
  return TrainingResult(
      algorithm=config.algorithm, output_dir=paths['run_dir'],
      rounds=config.rounds, resumed_from=resumed_from,
      train_metrics=train_rows[-1] if train_rows else {},
      eval_metrics=eval_rows[-1] if eval_rows else None,
      paths=paths, seconds=time.monotonic() - start_time)


def _step_sizes(config: TrainingConfig) -> dict:
  """The parameters a diverging run should lower, most likely first."""
  out = ({'beta': config.beta} if config.client_learning_rate is None
         else {'client_learning_rate': config.client_learning_rate})
  if config.algorithm != 'fedavg':
    out['alpha'] = config.alpha
  return out


def run(config: TrainingConfig,
        write: Optional[Callable[[str], None]] = None, *,
        also_train: Sequence[str] = ()) -> list[TrainingResult]:
  """Validates `config`, opens its execution context (`launch`: none of its
  own for runtime 'tff') and trains `config.algorithm`, then each algorithm
  of `also_train` with the same settings (e.g. `('fedavg',)`, the baseline).
  The owned runtime's workers are stopped on return and on an exception.
  `config.root_output_dir` is locked for the run (`outputs.OutputDirLock`):
  a second run there fails at once."""
  config = settings_lib.validate(config)
  configs = [config] + [
      dataclasses.replace(config, algorithm=algorithms.check_algorithm(
          a, 'also_train')) for a in also_train if a != config.algorithm]
  # The data is read (and its options checked) before anything is written.
  task = round_data.load_task(config)
  with outputs.OutputDirLock(config.root_output_dir) as lock:
    owner = lock.previous_owner
    if owner:
      (write or logging.info)(
          f'{config.root_output_dir}: took over the lock of a run that is no '
          f'longer running (pid {owner.get("pid")}, since '
          f'{owner.get("started")})')
    with launch.execution_context(
        config, resumable=any(outputs.has_checkpoint(c) for c in configs)):
      return [run_training(c, task=task, write=write) for c in configs]
