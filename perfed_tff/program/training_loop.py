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
  every round has exactly one row. A non-finite global training loss stops
  the run (`NonFiniteLossError`) before that round is checkpointed.
* Personalized evaluation (`perfed_tff.program.population_eval`) of the
  initial model (round 0), every `eval_every` rounds and at the end.

Every algorithm, every binary (`experiments/train.py`, `compare.py`) and the
notebook train through this one function; a comparison is a set of such runs.
It uses the current TFF context: open one with
`perfed_tff.runtime.ExecutionContext()` (or call `run(config)`, which does).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Optional

from absl import logging
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.program import checkpointing
from perfed_tff.program import config as config_lib
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import population_eval

TrainingConfig = config_lib.TrainingConfig
CheckpointError = checkpointing.CheckpointError
NonFiniteLossError = metrics_lib.NonFiniteLossError


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
  )


def build_process(config: TrainingConfig, task: task_lib.FederatedTask):
  return algorithms.build_algorithm(
      config.algorithm, task.model_fn, alpha=config.alpha, beta=config.beta,
      delta=config.delta, local_steps=config.local_steps,
      client_weighting=config.client_weighting)


def round_client_data(config: TrainingConfig, task: task_lib.FederatedTask,
                      round_num: int):
  """(client ids, batch streams) of round `round_num` (from 1): a pure
  function of (seed, round)."""
  return task_lib.round_client_data(
      task, clients_per_round=config.clients_per_round,
      num_batches=algorithms.batches_per_round(config.algorithm,
                                               config.local_steps),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


class _Preloaded(tff.program.ProgramStateManager):
  """Hands TFF's loop the state this program already loaded (and checked),
  then delegates to the real manager."""

  def __init__(self, manager: checkpointing.CheckpointManager, state,
               version: int):
    self._manager = manager
    self._loaded = (state, version)

  async def get_versions(self):
    return await self._manager.get_versions()

  async def load(self, version, structure):
    return await self._manager.load(version, structure)

  async def load_latest(self, structure):
    del structure
    return self._loaded

  async def save(self, program_state, version):
    await self._manager.save(program_state, version)


def _in_fresh_event_loop(fn: Callable[[], Any], stop: threading.Event):
  """Runs `fn` with a new asyncio event loop set for it. TFF's loop calls
  `asyncio.get_event_loop().run_until_complete`, which fails where a loop is
  already running (Jupyter); there `fn` runs in a helper thread, and an
  interrupt of the waiting thread sets `stop` (checked every round)."""

  def call():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
      return fn()
    finally:
      asyncio.set_event_loop(None)
      loop.close()

  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return call()
  # TFF's context stack is per thread: the helper runs in the caller's.
  context = context_stack_impl.context_stack.current

  def call_in_context():
    with context_stack_impl.context_stack.install(context):
      return call()

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(call_in_context)
    try:
      return future.result()
    except KeyboardInterrupt:
      stop.set()
      concurrent.futures.wait([future])
      raise


class _StopCheck(tff.program.ReleaseManager):

  def __init__(self, stop: threading.Event):
    self._stop = stop

  async def release(self, value, key) -> None:
    del value, key
    if self._stop.is_set():
      raise KeyboardInterrupt


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
    CheckpointError: the latest checkpoint is corrupt or from another run.
    NonFiniteLossError: the global loss became non-finite.
  """
  start_time = time.monotonic()
  write = write or logging.info
  task = task if task is not None else config_lib.load_task(config)
  config_lib.check_population(config, len(task.client_ids))
  process = process if process is not None else build_process(config, task)
  if not config.eval_every:
    evaluate_fn = None
  elif evaluate_fn is None:
    evaluate_fn = population_eval.build_evaluate_fn(config, task)
  paths = output_paths(config)
  for key in ('run_dir', 'checkpoints', 'tensorboard'):
    os.makedirs(paths[key], exist_ok=True)
  os.makedirs(os.path.dirname(paths['train_csv']), exist_ok=True)

  # Resume (or start) before writing anything else: a checkpoint of another
  # run raises here, with every file left as it was.
  checkpoints = checkpointing.CheckpointManager(
      paths['checkpoints'], metadata=config.resume_metadata(),
      keep_total=config.keep_checkpoints)
  initial_state = process.initialize()
  state, start_round = checkpointing.run_sync(
      checkpoints.load_latest(initial_state))
  resumed_from = None if state is None else start_round
  if state is None:
    state, start_round = initial_state, -1
  elif start_round > config.rounds:
    raise checks.ArgumentError(
        'rounds', f'must be >= the round of the checkpoint to resume '
        f'({start_round} in {paths["checkpoints"]}), got {config.rounds}')
  else:
    write(f'{config.algorithm}: resuming from round {start_round} '
          f'({checkpoints.path(start_round)})')
  metrics_lib.truncate_csv(paths['train_csv'], start_round)
  metrics_lib.truncate_csv(paths['eval_csv'], start_round)
  with open(paths['config'], 'w') as f:
    json.dump(config.to_json(), f, indent=1, sort_keys=True)

  bar = (metrics_lib.progress_bar(config.rounds, max(start_round, 0),
                                  config.algorithm)
         if config.progress else None)
  release = metrics_lib.RunReleaseManager(
      config.algorithm, train_csv=paths['train_csv'],
      eval_csv=paths['eval_csv'] if evaluate_fn else None,
      tensorboard_dir=paths['tensorboard'], write=write, bar=bar,
      last_good_checkpoint=lambda: (
          lambda r: r is not None and checkpoints.path(r))(
              checkpoints.latest_round()))
  stop = threading.Event()

  def evaluation_fn(state, unused_data):
    return evaluate_fn(process.get_model_weights(state))

  def train():
    return tff.simulation.run_training_process(
        process,
        training_selection_fn=lambda r: round_client_data(config, task, r)[1],
        total_rounds=config.rounds,
        evaluation_fn=evaluation_fn if evaluate_fn else None,
        evaluation_selection_fn=(lambda r: None) if evaluate_fn else None,
        rounds_per_evaluation=config.eval_every or 1,
        program_state_manager=(
            _Preloaded(checkpoints, state, start_round) if resumed_from
            is not None else checkpoints),
        rounds_per_saving_program_state=config.checkpoint_every,
        metrics_managers=[_StopCheck(stop), release])

  try:
    state = _in_fresh_event_loop(train, stop)
    if checkpoints.latest_round() != config.rounds:
      checkpointing.run_sync(checkpoints.save(state, config.rounds))
    eval_rows = metrics_lib.read_csv(paths['eval_csv'])
    if evaluate_fn and (not eval_rows or eval_rows[-1]['round']
                        != config.rounds):
      # The end of the run is evaluated even off the eval_every cadence.
      checkpointing.run_sync(release.release(
          {'evaluation': evaluation_fn(state, None)}, config.rounds))
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


def execution_context(config: TrainingConfig):
  """The `ExecutionContext` a run of `config` uses: a local worker, or the
  `config.workers` addresses."""
  from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
  # A local worker may start slowly on a busy machine: wait at least 60s.
  ready = (config.worker_timeout if config.workers
           else max(60.0, config.worker_timeout))
  return execution.ExecutionContext(
      workers=list(config.workers) or None, ready_timeout=ready,
      retry_timeout=config.worker_timeout,
      graph_optimization=config.graph_optimization)


def run(config: TrainingConfig,
        write: Optional[Callable[[str], None]] = None) -> list[TrainingResult]:
  """Validates `config`, opens its TFF execution context and trains
  `config.algorithm`, then FedAvg too when `config.compare_fedavg`. The
  context's workers are stopped on return, on an exception and on
  SIGTERM/SIGINT."""
  config = config_lib.validate(config)
  task = config_lib.load_task(config)
  config_lib.check_population(config, len(task.client_ids))
  configs = [config]
  if config.compare_fedavg and config.algorithm != 'fedavg':
    configs.append(dataclasses.replace(config, algorithm='fedavg'))
  with execution_context(config):
    return [run_training(c, task=task, write=write) for c in configs]
