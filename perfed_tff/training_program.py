"""The training program: rounds, checkpoints, exact resume, metrics, progress.

Built on `tff.program`:

* `perfed_tff.checkpointing.CheckpointManager` (a
  `tff.program.FileProgramStateManager`) saves the process state and the
  round every `checkpoint_every` rounds and at the end; a new start resumes
  from the latest checkpoint under `root_output_dir/<algorithm>/` by itself.
  Client sampling (`sample_clients(ids, n, seed, round)`) and batch shuffling
  (`derive_seed(seed, round, client)`) are pure functions of (seed, round), so
  a resumed run computes exactly what the uninterrupted run would have.
* Metrics go through release managers: `tff.program.CSVFileReleaseManager`
  (`metrics/train.csv`, `metrics/eval.csv`, keyed by round),
  `tff.program.TensorBoardReleaseManager` (`tensorboard/`) and a one-line log
  release manager. On resume the CSVs are cut back to the checkpoint's round,
  so every round has exactly one row.
* Personalized evaluation (`perfed_tff.evaluation`) every `eval_every` rounds
  and at the end.
* Faults: non-finite client updates are rejected by the process and counted
  in the metrics; a non-finite global training loss stops the run
  (`NonFiniteLossError`) without writing a checkpoint for that round.

`run(config)` owns the TFF execution context (a local `worker_binary`, or the
`config.workers` addresses); `run_training(config, ...)` uses the current one.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_federated as tff
import tqdm

from perfed_tff import algorithms as algorithms_lib
from perfed_tff import checkpointing
from perfed_tff import execution
from perfed_tff import flags_validation
from perfed_tff.data import task as task_lib

UsageError = flags_validation.UsageError
CheckpointError = checkpointing.CheckpointError
WorkerUnavailableError = execution.WorkerUnavailableError

TRAIN_LOSS = 'client_work/train/loss'
PERSONALIZED_LOSS = 'client_work/train/personalized_loss'
# Settings a checkpoint must share with the run that resumes it.
_RESUME_KEYS = ('algorithm', 'dataset', 'dataset_options', 'alpha', 'beta',
                'delta', 'local_steps', 'batch_size', 'clients_per_round',
                'seed', 'client_weighting')


class NonFiniteLossError(RuntimeError):
  """The global training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Arguments of one training run (the flags of `experiments/train.py`).

  algorithm: one of `perfed_tff.algorithms.ALGORITHMS`.
  dataset, dataset_options, cache_dir: `perfed_tff.data.registry.load_task`.
  rounds, clients_per_round, alpha, beta, delta, local_steps, batch_size,
    client_weighting: the algorithm (`perfed_tff.algorithms.build_algorithm`).
  seed: data generation, client sampling and batch shuffling.
  root_output_dir: outputs go to `<root_output_dir>/<algorithm>/`.
  checkpoint_every: save a checkpoint every N rounds (and at the end).
  keep_checkpoints: how many of the latest checkpoints to keep.
  eval_every: personalized evaluation every N rounds and at the end; 0: never.
  eval_clients: evaluate at most this many clients per population; 0: all.
  compare_fedavg: `run` also trains FedAvg with the same settings.
  workers: 'host:port' of running TFF workers; empty: one local worker.
  worker_timeout: seconds to wait for an unreachable worker.
  graph_optimization: where Grappler optimizes the TFF graphs ('auto',
    'runtime' or 'tff'; `perfed_tff.compilation`). Speed only.
  progress: show a progress bar (else one log line per round).
  """
  algorithm: str = 'per_fedavg_hf'
  dataset: str = 'synthetic'
  dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  cache_dir: Optional[str] = None
  rounds: int = 100
  clients_per_round: int = 10
  alpha: float = 0.01
  beta: float = 0.05
  delta: float = 1e-3
  local_steps: int = 5
  batch_size: int = 10
  client_weighting: str = 'uniform'
  seed: int = 0
  root_output_dir: str = '/tmp/perfed_tff'
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  eval_every: int = 10
  eval_clients: int = 100
  compare_fedavg: bool = False
  workers: Sequence[str] = ()
  worker_timeout: float = 30.0
  graph_optimization: str = 'auto'
  progress: bool = True

  def resume_metadata(self) -> dict:
    out = {k: getattr(self, k) for k in _RESUME_KEYS}
    out['dataset_options'] = json.loads(
        json.dumps(dict(self.dataset_options), sort_keys=True))
    return out


@dataclasses.dataclass
class TrainingResult:
  """What a run did and wrote."""
  algorithm: str
  output_dir: str
  rounds: int
  resumed_from: Optional[int]            # checkpoint round, None if fresh
  train_metrics: dict                    # last round's flattened metrics
  eval_metrics: Optional[dict]           # last evaluation (None if none)
  paths: dict                            # name -> path of every output
  seconds: float

  @property
  def train_loss(self) -> float:
    return float(self.train_metrics.get(TRAIN_LOSS, float('nan')))

  @property
  def personalized_loss(self) -> Optional[float]:
    v = self.train_metrics.get(PERSONALIZED_LOSS)
    return None if v is None else float(v)


# --------------------------------------------------------------------------
# Validation, data and process.


def validate(config: TrainingConfig) -> TrainingConfig:
  """Checks every argument that can be checked without data; returns the
  normalized config. Raises `UsageError`."""
  config = flags_validation.validate_config(
      config, algorithms=algorithms_lib.ALGORITHMS)
  try:
    from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
  except ImportError:
    registry = None
  if config.dataset_options:
    if registry is None:
      accepted = ['alpha', 'beta', 'num_users', 'num_unseen_users']
    else:
      accepted = list(registry.dataset_options(config.dataset))
    unknown = sorted(set(config.dataset_options) - set(accepted))
    if unknown:
      raise UsageError('dataset_options', f'unknown option(s) {unknown} for '
                       f'dataset {config.dataset!r}; accepted: {accepted}')
  return config


def load_task(config: TrainingConfig) -> task_lib.FederatedTask:
  """The dataset's `FederatedTask` (registry when present, else synthetic)."""
  try:
    from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
  except ImportError:
    registry = None
  try:
    if registry is not None:
      return registry.load_task(config.dataset, cache_dir=config.cache_dir,
                                seed=config.seed, **config.dataset_options)
    from perfed_tff.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.load_synthetic(seed=config.seed,
                                    **config.dataset_options)
  except (ValueError, TypeError) as e:
    unavailable = getattr(registry, 'DatasetUnavailableError', ())
    flag = 'cache_dir' if isinstance(e, unavailable) else 'dataset_options'
    raise UsageError(flag, str(e).splitlines()[0]) from e


def check_population(config: TrainingConfig,
                     task: task_lib.FederatedTask) -> None:
  flags_validation.check_clients_per_round(
      config.clients_per_round, len(task.client_ids), config.dataset)


def build_process(config: TrainingConfig, task: task_lib.FederatedTask):
  return algorithms_lib.build_algorithm(
      config.algorithm, task.model_fn, alpha=config.alpha, beta=config.beta,
      delta=config.delta, local_steps=config.local_steps,
      client_weighting=config.client_weighting)


def round_client_data(config: TrainingConfig, task: task_lib.FederatedTask,
                      round_num: int):
  """(client ids, batch streams) of round `round_num` (1-based): a pure
  function of (seed, round)."""
  return task_lib.round_client_data(
      task, clients_per_round=config.clients_per_round,
      num_batches=algorithms_lib.batches_per_round(config.algorithm,
                                                   config.local_steps),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


def build_evaluate_fn(config: TrainingConfig, task: task_lib.FederatedTask
                      ) -> Optional[Callable[[Any], dict]]:
  """`fn(model_weights) -> flat metrics` running `perfed_tff.evaluation`
  (one personalization step at alpha on each client's train data, metrics on
  its test data), or None when that module is not available."""
  try:
    from perfed_tff import evaluation  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  computation = evaluation.build_personalized_evaluation(
      task.model_fn, alpha=config.alpha, adaptation_steps=(1,))

  def pick(client_ids, name):
    ids = list(client_ids)
    if not config.eval_clients or len(ids) <= config.eval_clients:
      return ids
    rng = np.random.default_rng(task_lib.derive_seed(config.seed, 'eval',
                                                     name))
    return sorted(rng.choice(ids, config.eval_clients, replace=False).tolist())

  seen = pick(task.test.client_ids, 'seen')
  unseen = None if task.unseen is None else pick(task.unseen[1].client_ids,
                                                 'unseen')

  def evaluate(model_weights) -> dict:
    results = evaluation.evaluate_task(
        computation, model_weights, task, adapt_batch_size=config.batch_size,
        seed=config.seed, seen_client_ids=seen, unseen_client_ids=unseen)
    return flatten_metrics({pop: r.summary() for pop, r in results.items()})

  return evaluate


# --------------------------------------------------------------------------
# Metrics.


def flatten_metrics(structure, prefix: str = '') -> dict:
  """Nested mappings -> {'a/b/c': python number}; empty leaves dropped."""
  out = collections.OrderedDict()
  if isinstance(structure, Mapping):
    for k, v in structure.items():
      out.update(flatten_metrics(v, f'{prefix}{k}/'))
  elif isinstance(structure, (list, tuple)):
    for i, v in enumerate(structure):
      out.update(flatten_metrics(v, f'{prefix}{i}/'))
  else:
    value = np.asarray(structure)
    if value.size == 1:
      out[prefix.rstrip('/')] = value.item()
  return out


class LogLineReleaseManager(tff.program.ReleaseManager):
  """Releases a metrics mapping as one log line (`write` gets the line)."""

  def __init__(self, label: str, keys: Sequence[str],
               write: Callable[[str], None] = logging.info, *,
               short_names: bool = True):
    self._label = label
    self._keys = list(keys)
    self._write = write
    self._short = short_names

  async def release(self, value, key) -> None:
    parts = []
    for k in self._keys:
      if k in value:
        name = k.rsplit('/', 1)[-1] if self._short else k
        parts.append(f'{name}={_fmt(value[k])}')
    self._write(f'{self._label} round {key}: ' + ' '.join(parts))


def _fmt(v) -> str:
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def truncate_csv(path: str, max_round: int, key: str = 'round') -> None:
  """Drops the rows of `path` with `key` > `max_round` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    fieldnames = reader.fieldnames or [key]
    rows = [r for r in reader if r.get(key) not in (None, '')
            and int(r[key]) <= max_round]
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _last_csv_row(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return {}
  out = {}
  for k, v in rows[-1].items():
    try:
      out[k] = float(v)
    except (TypeError, ValueError):
      out[k] = v
  return out


def _release(managers, value, key) -> None:
  import asyncio  # pylint: disable=g-import-not-at-top

  async def all_of():
    await asyncio.gather(*[m.release(value, key) for m in managers])
  checkpointing.run_sync(all_of())


def save_model_weights(path: str, model_weights, round_num: int) -> str:
  """Writes `trainable_i`, `non_trainable_i` and `round` to an .npz
  (atomically)."""
  arrays = {f'trainable_{i}': np.asarray(w)
            for i, w in enumerate(model_weights.trainable)}
  arrays.update({f'non_trainable_{i}': np.asarray(w)
                 for i, w in enumerate(model_weights.non_trainable)})
  arrays['round'] = np.int64(round_num)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load_model_weights(path: str) -> dict:
  """The arrays of a `save_model_weights` file, by name."""
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------
# The program.


def output_paths(config: TrainingConfig) -> dict:
  run_dir = os.path.join(config.root_output_dir, config.algorithm)
  return collections.OrderedDict(
      run_dir=run_dir,
      checkpoints=os.path.join(run_dir, 'checkpoints'),
      train_csv=os.path.join(run_dir, 'metrics', 'train.csv'),
      eval_csv=os.path.join(run_dir, 'metrics', 'eval.csv'),
      tensorboard=os.path.join(run_dir, 'tensorboard'),
      final_model=os.path.join(run_dir, 'final_model.npz'),
      config=os.path.join(run_dir, 'config.json'),
  )


def run_training(config: TrainingConfig, *,
                 task: Optional[task_lib.FederatedTask] = None,
                 process=None,
                 evaluate_fn: Optional[Callable[[Any], dict]] = None,
                 write: Optional[Callable[[str], None]] = None
                 ) -> TrainingResult:
  """Trains `config.algorithm` to `config.rounds` rounds in the current TFF
  context, resuming from the latest checkpoint of this run if there is one.

  Args:
    config: a validated `TrainingConfig` (see `validate`).
    task: the dataset (default `load_task(config)`).
    process: the `LearningProcess` (default `build_process(config, task)`).
    evaluate_fn: `fn(model_weights) -> flat metrics` for the evaluation
      cadence (default `build_evaluate_fn`; None with eval_every=0).
    write: where human-readable lines go (default absl logging).

  Raises:
    UsageError: clients_per_round above the population.
    CheckpointError: the latest checkpoint is corrupt or from another run.
    NonFiniteLossError: the global loss became non-finite.
    WorkerUnavailableError: a TFF worker died or is unreachable.
  """
  start_time = time.monotonic()
  write = write or logging.info
  task = task if task is not None else load_task(config)
  check_population(config, task)
  process = process if process is not None else build_process(config, task)
  if evaluate_fn is None and config.eval_every:
    evaluate_fn = build_evaluate_fn(config, task)
  paths = output_paths(config)
  for key in ('run_dir', 'checkpoints', 'tensorboard'):
    os.makedirs(paths[key], exist_ok=True)
  os.makedirs(os.path.dirname(paths['train_csv']), exist_ok=True)

  # Resume (or start) before writing anything else.
  checkpoints = checkpointing.CheckpointManager(
      paths['checkpoints'], keep_total=config.keep_checkpoints)
  metadata = config.resume_metadata()
  initial_state = process.initialize()
  loaded = checkpoints.load_latest(initial_state, metadata)
  if loaded is None:
    state, start_round = initial_state, 0
    resumed_from = None
  else:
    state, start_round = loaded
    resumed_from = start_round
    if start_round > config.rounds:
      raise UsageError('rounds', f'must be >= the round of the checkpoint '
                       f'to resume ({start_round} in {paths["checkpoints"]}),'
                       f' got {config.rounds}')
    write(f'{config.algorithm}: resuming from round {start_round} '
          f'({checkpoints.path(start_round)})')
  truncate_csv(paths['train_csv'], start_round)
  truncate_csv(paths['eval_csv'], start_round)
  with open(paths['config'], 'w') as f:
    json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True,
              default=list)

  train_csv = tff.program.CSVFileReleaseManager(
      paths['train_csv'], save_mode=tff.program.CSVSaveMode.APPEND,
      key_fieldname='round')
  eval_csv = None
  if evaluate_fn is not None:
    eval_csv = tff.program.CSVFileReleaseManager(
        paths['eval_csv'], save_mode=tff.program.CSVSaveMode.APPEND,
        key_fieldname='round')
  tensorboard = tff.program.TensorBoardReleaseManager(paths['tensorboard'])
  bar = tqdm.tqdm(total=config.rounds, initial=start_round, unit='round',
                  desc=config.algorithm, disable=not config.progress,
                  file=sys.stderr, dynamic_ncols=True, leave=True)
  if config.progress:
    say = lambda line: tqdm.tqdm.write(line, file=sys.stderr)
  else:
    say = write
  train_log = LogLineReleaseManager(
      f'{config.algorithm} train',
      [TRAIN_LOSS, PERSONALIZED_LOSS, 'client_work/train/num_non_finite_updates',
       'finalizer/update_non_finite', 'round_seconds'], write)
  eval_log = LogLineReleaseManager(
      f'{config.algorithm} eval',
      ['seen/step_0/accuracy_mean', 'seen/step_1/accuracy_mean',
       'unseen/step_1/accuracy_mean'], say, short_names=False)
  train_managers = [train_csv]
  if not config.progress:
    train_managers.append(train_log)

  train_metrics = _last_csv_row(paths['train_csv'])
  eval_metrics = (_last_csv_row(paths['eval_csv']) or None
                  if evaluate_fn is not None else None)
  last_checkpoint = start_round if resumed_from is not None else None

  def evaluate_now(round_num):
    nonlocal eval_metrics
    eval_metrics = evaluate_fn(process.get_model_weights(state))
    _release([eval_csv, eval_log], eval_metrics, round_num)
    _release([tensorboard], {'eval': eval_metrics}, round_num)

  try:
    for round_num in range(start_round + 1, config.rounds + 1):
      t0 = time.monotonic()
      _, data = round_client_data(config, task, round_num)
      output = process.next(state, data)
      metrics = flatten_metrics(output.metrics)
      metrics['round_seconds'] = time.monotonic() - t0
      loss = metrics.get(TRAIN_LOSS)
      _release(train_managers, metrics, round_num)
      _release([tensorboard], {'train': metrics}, round_num)
      train_metrics = metrics
      if loss is not None and not math.isfinite(loss):
        where = (f'the last good checkpoint (round {last_checkpoint}) is '
                 f'{checkpoints.path(last_checkpoint)}'
                 if last_checkpoint is not None else 'no checkpoint was saved')
        raise NonFiniteLossError(
            f'{config.algorithm}: the global training loss is {loss} at round '
            f'{round_num}; stopping ({where}). Try a smaller --beta/--alpha.')
      state = output.state
      if (evaluate_fn is not None and config.eval_every
          and (round_num % config.eval_every == 0
               or round_num == config.rounds)):
        evaluate_now(round_num)
      if round_num % config.checkpoint_every == 0 or round_num == config.rounds:
        checkpoints.save(state, round_num, metadata)
        last_checkpoint = round_num
      bar.set_postfix(loss=f'{loss:.4f}' if loss is not None else 'n/a',
                      refresh=False)
      bar.update(1)
  finally:
    bar.close()

  if (evaluate_fn is not None and config.eval_every and eval_metrics is None):
    evaluate_now(config.rounds)  # Resumed a finished run without its eval.
  save_model_weights(paths['final_model'], process.get_model_weights(state),
                     config.rounds)
  paths = dict(paths)
  if not os.path.exists(paths['eval_csv']) or evaluate_fn is None:
    paths.pop('eval_csv', None)
  return TrainingResult(
      algorithm=config.algorithm, output_dir=paths['run_dir'],
      rounds=config.rounds, resumed_from=resumed_from,
      train_metrics=dict(train_metrics), eval_metrics=eval_metrics,
      paths=paths, seconds=time.monotonic() - start_time)


def run(config: TrainingConfig,
        write: Optional[Callable[[str], None]] = None) -> list[TrainingResult]:
  """Validates `config`, opens the TFF execution context (a local worker or
  `config.workers`) and trains `config.algorithm`, then FedAvg too when
  `config.compare_fedavg`. The context's workers are stopped on return, on
  an exception and on SIGTERM/SIGINT."""
  config = validate(config)
  write = write or logging.info
  task = load_task(config)
  check_population(config, task)
  configs = [config]
  if config.compare_fedavg and config.algorithm != 'fedavg':
    configs.append(dataclasses.replace(config, algorithm='fedavg'))
  results = []
  # A local worker may start slowly on a busy machine: wait at least 60s.
  ready = (config.worker_timeout if config.workers
           else max(60.0, config.worker_timeout))
  with execution.ExecutionContext(
      workers=list(config.workers) or None, ready_timeout=ready,
      retry_timeout=config.worker_timeout,
      graph_optimization=config.graph_optimization):
    for c in configs:
      results.append(run_training(c, task=task, write=write))
  return results


# --------------------------------------------------------------------------
# Reports.


def format_summary(result: TrainingResult) -> str:
  """One summary line, then the written paths."""
  parts = [f'{result.algorithm}: {result.rounds} rounds in '
           f'{result.seconds:.1f}s',
           f'train loss {result.train_loss:.4f}']
  if result.personalized_loss is not None:
    parts.append(f'train personalized loss {result.personalized_loss:.4f}')
  acc = (result.eval_metrics or {}).get('seen/step_1/accuracy_mean')
  if acc is not None:
    parts.append(f'personalized accuracy {acc:.4f}')
  if result.resumed_from is not None:
    parts.append(f'resumed from round {result.resumed_from}')
  lines = [', '.join(parts)]
  lines += [f'  {name}: {path}' for name, path in result.paths.items()]
  return '\n'.join(lines)


def format_comparison(results: Sequence[TrainingResult]) -> str:
  """Side-by-side final train loss, personalized loss and accuracy.

  With the personalized evaluation, the personalized loss/accuracy are those
  of the global model after one step at alpha on each client's train data,
  measured on its test data (the same protocol for every algorithm); without
  it, the personalized loss is Per-FedAvg's training f(w~; D') (n/a for
  FedAvg).
  """
  def num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return 'n/a'
    return f'{v:.4f}'
  have_eval = all(r.eval_metrics for r in results)
  rows = [('algorithm', 'train loss', 'personalized loss',
           'personalized accuracy', 'global accuracy')]
  for r in results:
    ev = r.eval_metrics or {}
    if have_eval:
      pl = ev.get('seen/step_1/loss_mean')
    else:
      pl = r.personalized_loss
    rows.append((r.algorithm, num(r.train_loss), num(pl),
                 num(ev.get('seen/step_1/accuracy_mean')),
                 num(ev.get('seen/step_0/accuracy_mean'))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for row in rows)
