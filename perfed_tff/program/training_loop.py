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
* A watchdog thread: every phase (a round, an evaluation, a checkpoint
  write) has a deadline (`round_timeout`, default derived from the measured
  round time) and, while it runs, the workers of the current
  `perfed_tff.runtime.ExecutionContext` are health-checked every few
  seconds. A frozen or unreachable worker, or a phase past its deadline, ends
  the run with `WorkerUnavailableError` (the computations in flight are
  cancelled and local workers killed); the last checkpoint stays resumable.
  A long phase is reported in a log line.
* Divergence: every client update rejected as non-finite (or no client
  taking a step) for `metrics.MAX_VOID_ROUNDS` rounds in a row, or a training
  loss `metrics.EXPLOSION_FACTOR` times its first-round value, stops the run
  (`DivergenceError`, a `NonFiniteLossError`) before it is checkpointed.

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
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional

from absl import logging
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets
from perfed_tff.program import checkpointing
from perfed_tff.program import config as config_lib
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import population_eval

TrainingConfig = config_lib.TrainingConfig
CheckpointError = checkpointing.CheckpointError
NonFiniteLossError = metrics_lib.NonFiniteLossError
DivergenceError = metrics_lib.DivergenceError

# The default (`round_timeout=0`) deadline of a phase: a round may take
# ROUND_TIMEOUT_FACTOR x the median round (rounds 2+), at least
# MIN_ROUND_TIMEOUT s; before two rounds are measured (compilation),
# FIRST_ROUND_TIMEOUT s. Evaluations get EVAL_TIMEOUT_FACTOR x a round's
# deadline (at least MIN_EVAL_TIMEOUT s), checkpoint writes
# FIRST_ROUND_TIMEOUT s (or `round_timeout` when set). Start-up and the first
# round of a process (tracing, compilation) get at least FIRST_ROUND_TIMEOUT.
ROUND_TIMEOUT_FACTOR = 20.0
MIN_ROUND_TIMEOUT = 60.0
FIRST_ROUND_TIMEOUT = 600.0
EVAL_TIMEOUT_FACTOR = 10.0
MIN_EVAL_TIMEOUT = 1800.0
HEALTH_CHECK_AFTER = 2.0    # s into a phase before the first health check
HEALTH_CHECK_EVERY = 5.0    # s between health checks


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
  """The run's `LearningProcess`. Per-FedAvg trains the task's model as a
  `FunctionalModel` (`task.functional_model()`: the same weights, math and
  metric names, but no model variables to create and initialize per client
  and round; about 80 ms of a round's fixed cost on the EMNIST CNN, see
  docs/performance.md); FedAvg is TFF's, on the task's `model_fn`."""
  model = (task.model_fn if config.algorithm == 'fedavg'
           else task.functional_model())
  return algorithms.build_algorithm(
      config.algorithm, model, alpha=config.alpha, beta=config.beta,
      delta=config.delta, local_steps=config.local_steps,
      # FedAvg has no inner steps (in a comparison it keeps its own).
      inner_steps=1 if config.algorithm == 'fedavg' else config.inner_steps,
      client_weighting=config.client_weighting)


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


class _Watchdog:
  """Deadlines and worker health checks of a run's phases (a thread).

  The main thread marks phases with `begin(label, kind)` / `end()`. While a
  phase runs, the workers of `context` (an `ExecutionContext` or None) are
  health-checked after HEALTH_CHECK_AFTER s and then every
  HEALTH_CHECK_EVERY s; a failed check, or the phase running past its
  deadline, sets `error` and aborts `context` (the calls in flight fail, local
  workers are killed), so the main thread gets an exception. A phase past
  its notice time is reported through `write` (then at doubling times).
  """

  def __init__(self, *, round_timeout: float, health_timeout: float,
               write: Callable[[str], None], context=None):
    self._explicit = round_timeout
    self._health_timeout = health_timeout
    self._write = write
    self._context = context
    self._lock = threading.Lock()
    self._phase = None  # (label, kind, start)
    self._seconds = collections.defaultdict(list)
    self._done = threading.Event()
    self.error = None
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='perfed_tff-watchdog')
    self._thread.start()

  def begin(self, label: str, kind: str) -> None:
    now = time.monotonic()
    with self._lock:
      self._close_phase(now)
      self._phase = (label, kind, now)

  def end(self) -> None:
    with self._lock:
      self._close_phase(time.monotonic())
      self._phase = None

  def _close_phase(self, now: float) -> None:
    if self._phase is not None:
      self._seconds[self._phase[1]].append(now - self._phase[2])

  def stop(self) -> None:
    self._done.set()
    self.end()

  def phase(self) -> Optional[str]:
    """The label of the phase running now (None between phases)."""
    with self._lock:
      return None if self._phase is None else self._phase[0]

  def deadline(self, kind: str) -> float:
    """Seconds the current phase of `kind` may take."""
    with self._lock:
      measured = list(self._seconds['round'])
    if kind == 'initialization' or (kind == 'round' and not measured):
      # Start-up and this process's first round trace and compile.
      return max(self._explicit, FIRST_ROUND_TIMEOUT)
    rounds = measured[1:]
    if self._explicit:
      base = self._explicit
    elif len(rounds) >= 2:
      base = max(MIN_ROUND_TIMEOUT,
                 ROUND_TIMEOUT_FACTOR * statistics.median(rounds))
    else:
      base = FIRST_ROUND_TIMEOUT
    if kind == 'evaluation':
      return (EVAL_TIMEOUT_FACTOR * base if self._explicit else
              max(MIN_EVAL_TIMEOUT, EVAL_TIMEOUT_FACTOR * base))
    if kind == 'checkpoint':
      return self._explicit or FIRST_ROUND_TIMEOUT
    return base

  def _watch(self) -> None:
    checked_at = notice = interrupted_at = None
    current = None
    while not self._done.wait(0.5):
      now = time.monotonic()
      if _execution().interrupt_received() is not None:
        # The main thread should be unwinding; if the interrupt was
        # swallowed (a GC callback), deliver it again. Workers stopped by
        # the signal are no failure.
        if interrupted_at is None:
          interrupted_at = now
        elif now - interrupted_at >= 2.0 and not self._done.is_set():
          _execution().redeliver_interrupt()
          interrupted_at = now
        continue
      with self._lock:
        phase = self._phase
      if phase is None:
        continue
      label, kind, start = phase
      if phase is not current:
        current, checked_at = phase, None
        notice = max(30.0, self.deadline(kind) / 8)
      elapsed = now - start
      if (self._context is not None and elapsed >= HEALTH_CHECK_AFTER and
          (checked_at is None or now - checked_at >= HEALTH_CHECK_EVERY)):
        checked_at = now
        bad = self._context.unhealthy(self._health_timeout)
        with self._lock:
          still = self._phase is phase
        if bad and still and not self._done.is_set():
          address, why = bad[0]
          self._fail(_execution().WorkerUnavailableError(
              f'{self._context.describe(address)} {why} during {label}; '
              'stopped the run.'), phase)
          return
      limit = self.deadline(kind)
      if elapsed > limit and not self._done.is_set():
        flag = (f'--round_timeout={self._explicit:g}' if self._explicit
                else 'raise it with --round_timeout')
        self._fail(_execution().RoundTimeoutError(
            f'{label} did not finish within its {limit:.0f}s deadline '
            f'({flag}); stopped the run.'), phase)
        return
      if elapsed >= notice:
        self._write(f'{label} still running after {elapsed:.0f}s (deadline '
                    f'{limit:.0f}s)')
        notice *= 2

  def _fail(self, error, phase) -> None:
    self.error = error
    if self._context is not None:
      self._context.abort(error)
    # Blocked outside a worker call (nothing to cancel): interrupt it.
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not self._done.is_set():
      with self._lock:
        if self._phase is not phase:
          return
      time.sleep(0.2)
    if not self._done.is_set():
      import _thread  # pylint: disable=g-import-not-at-top
      _thread.interrupt_main()


def _execution():
  from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
  return execution


class _Checkpoints(tff.program.ProgramStateManager):
  """The run's `CheckpointManager`, with each save a watched phase whose
  interruption is deferred to its end (a checkpoint is written whole)."""

  def __init__(self, manager: checkpointing.CheckpointManager,
               watchdog: _Watchdog):
    self._manager = manager
    self._watchdog = watchdog

  async def get_versions(self):
    return await self._manager.get_versions()

  async def load(self, version, structure):
    return await self._manager.load(version, structure)

  async def save(self, program_state, version):
    self._watchdog.begin(f'checkpoint {version}', 'checkpoint')
    with _execution().critical_section():
      await self._manager.save(program_state, version)
    self._watchdog.end()


class _Initialized:
  """`process` whose `initialize()` returns the state this program already
  computed: TFF's loop calls it again only for the state's structure."""

  def __init__(self, process, initial_state):
    self._process = process
    self._initial_state = initial_state
    self.next = process.next

  def initialize(self):
    return self._initial_state


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

  def __init__(self, stop: threading.Event, watchdog: _Watchdog):
    self._stop = stop
    self._watchdog = watchdog

  async def release(self, value, key) -> None:
    del value, key
    self._watchdog.end()  # The round (and its evaluation) are done.
    signum = _execution().interrupt_received()
    if signum is not None:  # Its exception was swallowed on the way.
      raise _execution().Interrupted(signum)
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
  config_lib.check_population(config, len(task.client_ids), task)
  config_lib.check_output_paths(config)
  context = _execution().current()
  watchdog = _Watchdog(round_timeout=config.round_timeout,
                       health_timeout=config.worker_timeout, write=write,
                       context=context)
  try:
    return _run_training(config, task, process, evaluate_fn, write,
                         watchdog, start_time)
  except BaseException as e:
    if watchdog.error is not None:
      # Its abort (or, blocked elsewhere, its interrupt) caused `e`.
      _execution().clear_interrupt()
      raise _with_worker_logs(watchdog.error, config, context) from None
    signum = _execution().interrupt_received()
    if signum is not None and not isinstance(e, KeyboardInterrupt):
      # The signal stopped the workers and its exception was swallowed: the
      # error that followed is the interrupt's.
      e = _execution().Interrupted(signum)
    if isinstance(e, KeyboardInterrupt):
      if not hasattr(e, 'phase'):
        e.phase = watchdog.phase()  # For the one-line message.
      raise e from None
    if isinstance(e, _execution().WorkerUnavailableError):
      raise _with_worker_logs(e, config, context) from None
    raise
  finally:
    watchdog.stop()


def _with_worker_logs(error, config: TrainingConfig, context):
  """`error` with the logs of the context's local workers copied into the
  run folder (and named in the message)."""
  kept = []
  for worker in getattr(context, 'local_workers', ()):
    path = worker.keep_log(os.path.join(config.run_dir,
                                        f'worker_{worker.port}.log'))
    if path:
      kept.append(path)
  if not kept:
    return error
  return type(error)(f'{str(error).rstrip()} (worker log: '
                     f'{", ".join(kept)})')


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
          'another --root_output_dir') from None


def _run_training(config, task, process, evaluate_fn, write, watchdog,
                  start_time) -> TrainingResult:
  """`run_training` under `watchdog`."""
  watchdog.begin('start-up', 'initialization')
  process = process if process is not None else build_process(config, task)
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
      keep_total=config.keep_checkpoints)
  initial_state = process.initialize()
  state, start_round = checkpointing.run_sync(
      checkpoints.load_latest(initial_state))
  watchdog.end()
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
  _truncate_metric_files(paths, start_round)
  # Rounds after the checkpoint are trained again: TensorBoard holds each once.
  metrics_lib.prune_tensorboard(paths['tensorboard'], start_round)
  with open(paths['config'], 'w') as f:
    json.dump(config.to_json(), f, indent=1, sort_keys=True)
  first_rows = metrics_lib.read_csv(paths['train_csv'])[:1]

  bar = (metrics_lib.progress_bar(config.rounds, max(start_round, 0),
                                  config.algorithm)
         if config.progress else None)
  release = metrics_lib.RunReleaseManager(
      config.algorithm, train_csv=paths['train_csv'],
      eval_csv=paths['eval_csv'] if evaluate_fn else None,
      tensorboard_dir=paths['tensorboard'], write=write, bar=bar,
      last_good_checkpoint=lambda: (
          lambda r: r is not None and checkpoints.path(r))(
              checkpoints.latest_round()),
      clients_per_round=config.clients_per_round,
      reference_loss=(first_rows[0].get(metrics_lib.TRAIN_LOSS)
                      if first_rows else None),
      hyperparameters=_step_sizes(config))
  stop = threading.Event()
  managed = _Checkpoints(checkpoints, watchdog)

  def evaluation_fn(state, round_num):
    # evaluation_selection_fn hands TFF's loop the round as the "data".
    watchdog.begin(f'evaluation at round {round_num}', 'evaluation')
    return evaluate_fn(process.get_model_weights(state))

  # Client batches are built on the worker from each client's examples.
  on_worker = worker_side_process(config, task, process)
  examples = worker_datasets.client_examples(task.train)

  def selection_fn(round_num):
    watchdog.begin(f'round {round_num}', 'round')
    if on_worker is process:
      return round_client_data(config, task, round_num)[1]
    return round_client_inputs(config, task, round_num, examples)[1]

  def train():
    return tff.simulation.run_training_process(
        _Initialized(on_worker, initial_state),
        training_selection_fn=selection_fn,
        total_rounds=config.rounds,
        evaluation_fn=evaluation_fn if evaluate_fn else None,
        evaluation_selection_fn=(lambda r: r) if evaluate_fn else None,
        rounds_per_evaluation=config.eval_every or 1,
        program_state_manager=(
            _Preloaded(managed, state, start_round) if resumed_from
            is not None else managed),
        rounds_per_saving_program_state=config.checkpoint_every,
        metrics_managers=[_StopCheck(stop, watchdog), release])

  try:
    state = _in_fresh_event_loop(train, stop)
    if checkpoints.latest_round() != config.rounds:
      checkpointing.run_sync(managed.save(state, config.rounds))
    eval_rows = metrics_lib.read_csv(paths['eval_csv'])
    if evaluate_fn and (not eval_rows or eval_rows[-1]['round']
                        != config.rounds):
      # The end of the run is evaluated even off the eval_every cadence.
      checkpointing.run_sync(release.release(
          {'evaluation': evaluation_fn(state, config.rounds)},
          config.rounds))
      watchdog.end()
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
  """The flags a diverging run should lower, most likely first."""
  out = {'beta': config.beta}
  if config.algorithm != 'fedavg':
    out['alpha'] = config.alpha
  return out


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
  SIGTERM/SIGINT/SIGHUP. `config.root_output_dir` is locked for the run
  (`checkpointing.OutputDirLock`): a second run there fails at once."""
  config = config_lib.validate(config)
  with checkpointing.OutputDirLock(config.root_output_dir) as lock:
    owner = lock.previous_owner
    if owner:
      (write or logging.info)(
          f'{config.root_output_dir}: took over the lock of a run that is no '
          f'longer running (pid {owner.get("pid")}, since '
          f'{owner.get("started")})')
    task = config_lib.load_task(config)
    config_lib.check_population(config, len(task.client_ids), task)
    configs = [config]
    if config.compare_fedavg and config.algorithm != 'fedavg':
      configs.append(dataclasses.replace(config, algorithm='fedavg'))
    with execution_context(config):
      return [run_training(c, task=task, write=write) for c in configs]
