"""The training program: TFF's training loop with checkpoints, exact resume,
metrics, evaluation and a progress bar.

`run_training(config)` runs `tff.simulation.run_training_process` (rounds
numbered from 1; round 0 is the initial model) with

* `perfed_tff.program.checkpointing.CheckpointManager` (a
  `tff.program.FileProgramStateManager`) as its program state manager: a
  checkpoint at round 0, every `checkpoint_every` rounds and at the end; a new
  start resumes from the latest one under `<root_output_dir>/<algorithm>/`.
  Client sampling (`task.sample_clients(ids, n, seed, round)`) and batch
  shuffling (`task.derive_seed(seed, round, client)`) are pure functions of
  (seed, round), so a resumed run computes exactly what the uninterrupted run
  would have.
* `perfed_tff.program.metrics.RunReleaseManager` as its metrics manager
  (`metrics/train.csv`, `metrics/eval.csv`, TensorBoard, log lines or a
  progress bar). On resume the CSVs are cut back to the checkpoint's round, so
  every round has exactly one row.
* Personalized evaluation (`perfed_tff.program.population_eval`) of the
  initial model (round 0), every `eval_every` rounds and at the end.
* Supervision (`perfed_tff.runtime.supervision.Supervisor`): every phase
  (start-up, a round, an evaluation, a checkpoint write) has a deadline and
  the workers are health-checked while it runs; a dead or frozen worker, a
  phase past its deadline or a signal ends the run with a typed error, and
  the last checkpoint stays resumable. Checkpoint writes are never cut short.
* Divergence (`perfed_tff.program.divergence.DivergenceCheck`, asked after
  every round as TFF's `should_discard_round` is): no usable client update
  for several rounds in a row, an exploding or a non-finite loss stops the
  run before that round is checkpointed.

Every algorithm, every binary (`experiments/train.py`, `compare.py`) and the
notebook train through this one function; a comparison is a set of such runs.
It uses the current TFF context: open one with
`perfed_tff.runtime.ExecutionContext()` (or call `run(config)`, which does).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets
from perfed_tff.program import checkpointing
from perfed_tff.program import computation_cache
from perfed_tff.program import config as config_lib
from perfed_tff.program import divergence
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import model_choice
from perfed_tff.program import population_eval
from perfed_tff.program import round_blocks
from perfed_tff.program import supervised_loop
from perfed_tff.runtime import execution
from perfed_tff.runtime import worker_errors
from perfed_tff.runtime import supervision

TrainingConfig = config_lib.TrainingConfig
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


def output_paths(config: TrainingConfig) -> collections.OrderedDict:
  run_dir = config.run_dir
  return collections.OrderedDict(
      run_dir=run_dir,
      checkpoints=os.path.join(run_dir, 'checkpoints'),
      train_csv=os.path.join(run_dir, 'metrics', 'train.csv'),
      eval_csv=os.path.join(run_dir, 'metrics', 'eval.csv'),
      tensorboard=os.path.join(run_dir, 'tensorboard'),
      final_model=os.path.join(run_dir, 'final_model.npz'),
      config=os.path.join(run_dir, 'config.json'),
      hparams=os.path.join(run_dir, 'hparams.csv'),
  )


def write_settings(config: TrainingConfig, paths) -> None:
  """The run's settings beside its metrics: `config.json` (the config) and
  `hparams.csv` (a header and one row: every setting, flat, as TFF research
  binaries write it; `TrainingConfig.to_hparams`)."""
  with open(paths['config'], 'w') as f:
    json.dump(config.to_json(), f, indent=1, sort_keys=True)
  row = config.to_hparams()
  with open(paths['hparams'], 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)


def build_process(config: TrainingConfig, task: task_lib.FederatedTask):
  """The run's `LearningProcess`, on the task's model as a `FunctionalModel`
  (`task.functional_model()`: the same weights, math and metric names as
  `task.model_fn`, but no model variables to create and initialize per
  client and round; docs/performance.md); FedAvg's model is
  `model_choice.fed_avg_model`'s. The client and server optimizers are the
  config's (`config.build_optimizer`)."""
  if config.algorithm == 'fedavg':
    model = model_choice.fed_avg_model(task.functional_model, task.model_fn,
                                       task.keras_model_fn)
  else:
    model = task.functional_model()
  # None: the algorithm's default (SGD at beta; SGD at 1.0), as before the
  # optimizer settings existed.
  client_optimizer = config_lib.build_optimizer(config, 'client')
  return algorithms.build_algorithm(
      config.algorithm, model, alpha=config.alpha,
      beta=config.beta if client_optimizer is None else None,
      delta=config.delta, local_steps=config.local_steps,
      # FedAvg has no inner steps (in a comparison it keeps its own).
      inner_steps=1 if config.algorithm == 'fedavg' else config.inner_steps,
      client_weighting=config.client_weighting,
      client_optimizer_fn=client_optimizer,
      server_optimizer_fn=config_lib.build_optimizer(config, 'server'))


def _built_processes(config: TrainingConfig, task: task_lib.FederatedTask):
  """(the run's process, its `worker_side_process`), traced now."""
  process = build_process(config, task)
  return process, worker_side_process(config, task, process)


def _batches_per_round(config: TrainingConfig) -> int:
  return algorithms.batches_per_round(config.algorithm, config.local_steps,
                                      inner_steps=config.inner_steps)


def round_client_data(config: TrainingConfig, task: task_lib.FederatedTask,
                      round_num: int):
  """(client ids, batch streams) of round `round_num` (from 1): a pure
  function of (seed, round)."""
  return task_lib.round_client_data(
      task, clients_per_round=config.clients_per_round,
      num_batches=_batches_per_round(config),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


def worker_side_process(config: TrainingConfig, task: task_lib.FederatedTask,
                        process):
  """`process` composed with the worker-side batch pipeline
  (`perfed_tff.data.worker_datasets`): it takes `round_client_inputs`
  (examples and seeds) instead of datasets, builds the very same batches on
  the worker, and has `process`'s state. A process whose client data are
  not datasets is returned as it is (it takes `round_client_data`)."""
  if not worker_datasets.takes_datasets(process):
    return process
  return worker_datasets.compose(
      process, task.train.element_type_structure,
      batch_size=config.batch_size, num_batches=_batches_per_round(config),
      shuffle_buffer=task.shuffle_buffer)


def round_client_inputs(config: TrainingConfig, task: task_lib.FederatedTask,
                        round_num: int,
                        examples: Optional[worker_datasets.ClientExamples] = None):
  """(client ids, inputs of a `worker_side_process`) of round `round_num`:
  the clients and batches of `round_client_data`."""
  return worker_datasets.round_client_inputs(
      task, examples, clients_per_round=config.clients_per_round,
      seed=config.seed, round_num=round_num)


def run_training(config: TrainingConfig, *,
                 task: Optional[task_lib.FederatedTask] = None,
                 process=None,
                 evaluate_fn: Optional[Callable[[Any], dict]] = None,
                 write: Optional[Callable[[str], None]] = None
                 ) -> TrainingResult:
  """Trains `config.algorithm` to `config.rounds` rounds in the current TFF
  context, resuming from the latest checkpoint of this run if there is one.

  Args:
    config: a validated `TrainingConfig` (see `config.validate`).
    task: the dataset (default `config.load_task(config)`).
    process: the `LearningProcess` (default `build_process(config, task)`).
    evaluate_fn: `fn(model_weights) -> nested metrics` (default
      `population_eval.build_evaluate_fn`; unused with eval_every=0).
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
  task = task if task is not None else config_lib.load_task(config)
  config_lib.check_population(config, len(task.client_ids), task)
  config_lib.check_output_paths(config)
  with supervision.Supervisor(round_timeout=config.round_timeout,
                              health_timeout=config.worker_timeout,
                              write=write,
                              run_dir=config.run_dir) as supervisor:
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
  state, start_round = supervision.run_sync(
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


def _run_training(config, task, process, evaluate_fn, write,
                  supervisor: supervision.Supervisor,
                  start_time) -> TrainingResult:
  """`run_training` under `supervisor`."""
  supervisor.begin('start-up', 'initialization')
  if process is None:
    # Traced once per settings and kept across runs (computation_cache).
    process, on_worker = computation_cache.training_processes(
        config, task, lambda: _built_processes(config, task))
  else:
    on_worker = worker_side_process(config, task, process)
  if not config.eval_every:
    evaluate_fn = None
  elif evaluate_fn is None:
    evaluate_fn = population_eval.build_evaluate_fn(config, task)
  paths = output_paths(config)
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
  write_settings(config, paths)
  first_rows = metrics_lib.read_csv(paths['train_csv'])[:1]

  bar = (metrics_lib.progress_bar(config.rounds, max(start_round, 0),
                                  config.algorithm)
         if config.progress else None)
  # Client batches are built on the worker from each client's examples.
  examples = worker_datasets.client_examples(task.train)
  blocks = round_blocks.for_run(
      config, process, on_worker,
      round_inputs=lambda r: round_client_inputs(config, task, r, examples)[1])
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
    return evaluate_fn(process.get_model_weights(state))

  supervised = supervised_loop.SupervisedProcess(
      on_worker, initial_state, supervisor, check, blocks)

  def selection_fn(round_num):
    supervised.begin_round(round_num)
    if blocks is not None:
      return round_num  # The block builds its rounds' inputs.
    if on_worker is process:
      return round_client_data(config, task, round_num)[1]
    return round_client_inputs(config, task, round_num, examples)[1]

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
      supervision.run_sync(release.release(supervised.last_metrics,
                                           e.round_num))
      raise
    supervisor.check_stop()
    if checkpoints.latest_round() != config.rounds:
      supervision.run_sync(managed.save(state, config.rounds))
    eval_rows = metrics_lib.read_csv(paths['eval_csv'])
    if evaluate_fn and (not eval_rows or eval_rows[-1]['round']
                        != config.rounds):
      # The end of the run is evaluated even off the eval_every cadence.
      supervision.run_sync(release.release(
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


class WorkerUnreachableError(checks.ArgumentError,
                             worker_errors.WorkerUnavailableError):
  """A `workers` address where no TFF worker answers when a run that has no
  checkpoint yet starts: there is nothing to resume; the worker or the
  address must be fixed. A `checks.ArgumentError` naming `workers` (the
  binaries exit 2) and a `WorkerUnavailableError`."""


def has_checkpoint(config: TrainingConfig) -> bool:
  """Whether the run of `config` has a checkpoint to resume from."""
  try:
    names = os.listdir(output_paths(config)['checkpoints'])
  except OSError:
    return False
  pattern = re.compile(re.escape(checkpointing.PREFIX) + r'\d+')
  return any(pattern.fullmatch(name) for name in names)


def execution_context(config: TrainingConfig, *,
                      resumable: Optional[bool] = None):
  """The `ExecutionContext` a run of `config` uses: a local worker, or the
  `config.workers` addresses.

  Raises:
    WorkerUnreachableError: a `config.workers` address does not answer and
      the run is not `resumable` (default: whether `config`'s run has a
      checkpoint). A resumable run raises the context's
      `WorkerUnavailableError` (rerunning resumes once the worker is back).
  """
  # A local worker may start slowly on a busy machine: wait at least 60s.
  ready = (config.worker_timeout if config.workers
           else max(60.0, config.worker_timeout))
  try:
    return execution.ExecutionContext(
        workers=list(config.workers) or None, ready_timeout=ready,
        retry_timeout=config.worker_timeout,
        graph_optimization=config.graph_optimization)
  except worker_errors.WorkerUnavailableError as e:
    address = e.unready_address
    if resumable is None:
      resumable = has_checkpoint(config)
    if address is None or resumable:
      raise
    port = address.rpartition(':')[2]
    raise WorkerUnreachableError(
        'workers', f'no TFF worker answered at {address} within '
        f'{e.ready_timeout:g}s, so no run was started; check that '
        f'`python -m perfed_tff.runtime.worker --port={port}` is running on '
        'that host and that the host and port are right and reachable from '
        'here (a worker listens on its own loopback only unless started '
        'with `--listen=all`, or reach it through an SSH tunnel; one still '
        'starting up may need a longer worker_timeout)') from None


def run(config: TrainingConfig,
        write: Optional[Callable[[str], None]] = None, *,
        also_train: Sequence[str] = ()) -> list[TrainingResult]:
  """Validates `config`, opens its TFF execution context and trains
  `config.algorithm`, then each algorithm of `also_train` with the same
  settings (e.g. `('fedavg',)`, the baseline). The context's workers are
  stopped on return, on an exception and on SIGTERM/SIGINT/SIGHUP.
  `config.root_output_dir` is locked for the run
  (`checkpointing.OutputDirLock`): a second run there fails at once."""
  config = config_lib.validate(config)
  configs = [config] + [
      dataclasses.replace(config, algorithm=algorithms.check_algorithm(
          a, 'also_train')) for a in also_train if a != config.algorithm]
  # The data is read (and its options checked) before anything is written.
  task = config_lib.load_task(config)
  with checkpointing.OutputDirLock(config.root_output_dir) as lock:
    owner = lock.previous_owner
    if owner:
      (write or logging.info)(
          f'{config.root_output_dir}: took over the lock of a run that is no '
          f'longer running (pid {owner.get("pid")}, since '
          f'{owner.get("started")})')
    with execution_context(
        config, resumable=any(has_checkpoint(c) for c in configs)):
      return [run_training(c, task=task, write=write) for c in configs]
