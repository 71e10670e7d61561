"""`TrainingConfig`: the settings of one training run, and their validation.

One field set for every binary: `experiments/train.py`, `compare.py` and
`reproduce_paper.py` define one flag per field (same name, same meaning, see
`experiments/cli.py`), and a comparison is a set of runs of this config that
differ only in `algorithm` and `seed` (and step sizes in a grid).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff import personalization_eval
from perfed_tff.data import registry
from perfed_tff.runtime import compilation

CLIENT_WEIGHTINGS = ('uniform', 'num_examples')
# Settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = ('algorithm', 'dataset', 'dataset_options', 'alpha', 'beta',
               'delta', 'local_steps', 'batch_size', 'clients_per_round',
               'seed', 'client_weighting')


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Arguments of one training run (one flag each in the binaries).

  algorithm: one of `perfed_tff.algorithms.ALGORITHMS`.
  dataset, dataset_options, cache_dir: `perfed_tff.data.registry.load_task`.
  rounds, clients_per_round, alpha, beta, delta, local_steps, batch_size,
    client_weighting: the algorithm (`perfed_tff.algorithms.build_algorithm`).
  seed: data split, model initialization, client sampling, batch shuffling.
  root_output_dir: outputs go to `<root_output_dir>/<algorithm>/`.
  checkpoint_every: save a checkpoint every N rounds (and at the end).
  keep_checkpoints: how many of the latest checkpoints to keep.
  eval_every: personalized evaluation of the global model at round 0, every
    N rounds and at the end; 0: never.
  eval_clients: evaluate at most this many clients per population; 0: all.
  eval_steps: adaptation steps k measured by the evaluation (k SGD steps at
    alpha on the client's train data; 1 is the paper's protocol).
  eval_protocols: 'heldout' (the step on the user's train data, metrics on
    its held-out test data; the default) and/or 'paper' (the step on a batch
    of its test data, as the paper is quoted; populations 'seen_paper',
    'unseen_paper').
  adapt_batch_size: batch of each adaptation step; None: `batch_size`.
  compare_fedavg: `run` also trains FedAvg with the same settings.
  workers: 'host:port' of running TFF workers; empty: one local worker.
  worker_timeout: seconds to wait for an unreachable worker.
  graph_optimization: where Grappler optimizes the TFF graphs
    (`perfed_tff.runtime.compilation`). Speed only.
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
  eval_steps: Sequence[int] = (1,)
  eval_protocols: Sequence[str] = ('heldout',)
  adapt_batch_size: Optional[int] = None
  compare_fedavg: bool = False
  workers: Sequence[str] = ()
  worker_timeout: float = 30.0
  graph_optimization: str = 'auto'
  progress: bool = True

  def resume_metadata(self) -> dict:
    """The settings a checkpoint records and a resumed run must match."""
    out = {k: getattr(self, k) for k in RESUME_KEYS}
    out['dataset_options'] = json.loads(
        json.dumps(dict(self.dataset_options), sort_keys=True))
    return out

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.algorithm)

  @property
  def effective_adapt_batch_size(self) -> int:
    return self.adapt_batch_size or self.batch_size


def validate(config: TrainingConfig) -> TrainingConfig:
  """Checks every field that can be checked without data; returns the
  normalized config.

  Raises:
    checks.ArgumentError: the first bad field (named as its flag).
  """
  algorithms.check_algorithm(config.algorithm)
  checks.choice('dataset', config.dataset, registry.DATASETS)
  checks.choice('client_weighting', config.client_weighting,
                CLIENT_WEIGHTINGS)
  compilation.check_graph_optimization(config.graph_optimization)
  adapt = config.adapt_batch_size
  changes = dict(
      alpha=checks.positive_float('alpha', config.alpha),
      beta=checks.positive_float('beta', config.beta),
      delta=checks.positive_float('delta', config.delta),
      rounds=checks.integer('rounds', config.rounds, 1),
      clients_per_round=checks.integer('clients_per_round',
                                       config.clients_per_round, 1),
      local_steps=checks.integer('local_steps', config.local_steps, 1),
      batch_size=checks.integer('batch_size', config.batch_size, 1),
      seed=checks.integer('seed', config.seed, 0, 2**32 - 1),
      checkpoint_every=checks.integer('checkpoint_every',
                                      config.checkpoint_every, 1),
      keep_checkpoints=checks.integer('keep_checkpoints',
                                      config.keep_checkpoints, 1),
      eval_every=checks.integer('eval_every', config.eval_every, 0),
      eval_clients=checks.integer('eval_clients', config.eval_clients, 0),
      eval_steps=checks.int_list('eval_steps', config.eval_steps, 1),
      eval_protocols=_protocols(config.eval_protocols),
      adapt_batch_size=(None if adapt is None else
                        checks.integer('adapt_batch_size', adapt, 1)),
      worker_timeout=checks.positive_float('worker_timeout',
                                           config.worker_timeout),
      workers=checks.worker_addresses('workers', config.workers),
      root_output_dir=checks.writable_dir('root_output_dir',
                                          config.root_output_dir),
      cache_dir=checks.existing_dir('cache_dir', config.cache_dir),
      dataset_options=checks.key_values('dataset_options',
                                        config.dataset_options),
  )
  accepted = registry.dataset_options(config.dataset)
  unknown = sorted(set(changes['dataset_options']) - set(accepted))
  if unknown:
    raise checks.ArgumentError(
        'dataset_options', f'unknown option(s) {unknown} for dataset '
        f'{config.dataset!r}; accepted: {list(accepted)}')
  return dataclasses.replace(config, **changes)


def _protocols(value) -> tuple[str, ...]:
  items = value.split(',') if isinstance(value, str) else list(value)
  items = tuple(str(p).strip() for p in items if str(p).strip())
  if not items or len(set(items)) != len(items):
    raise checks.ArgumentError(
        'eval_protocols', f'must list distinct protocols, got {value!r}')
  for p in items:
    personalization_eval.check_protocol(p)
  return items


def load_task(config: TrainingConfig):
  """The dataset's `FederatedTask` for `config.seed`.

  Raises:
    checks.ArgumentError: a dataset option the loader rejects
      (`dataset_options`), or a dataset file that cannot be had (`cache_dir`).
  """
  try:
    return registry.load_task(config.dataset, cache_dir=config.cache_dir,
                              seed=config.seed, **config.dataset_options)
  except (ValueError, TypeError) as e:
    if isinstance(e, checks.ArgumentError) and e.name in ('cache_dir',
                                                          'dataset_options'):
      raise
    flag = ('cache_dir' if isinstance(e, registry.DatasetUnavailableError)
            else 'dataset_options')
    raise checks.ArgumentError(flag, str(e).splitlines()[0].rstrip('.')) from e


def check_population(config: TrainingConfig, num_clients: int) -> None:
  if config.clients_per_round > num_clients:
    raise checks.ArgumentError(
        'clients_per_round', 'must be between 1 and the population of '
        f'{config.dataset!r} ({num_clients} clients), got '
        f'{config.clients_per_round}')
