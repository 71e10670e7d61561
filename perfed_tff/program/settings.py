"""`TrainingConfig`: the settings of one training run, and their validation.

One field set for every binary: `experiments/train.py`, `compare.py` and
`reproduce_paper.py` define one flag per field (same name, same meaning, see
`experiments/cli.py`), and a comparison is a set of runs of this config that
differ only in `algorithm` and `seed` (and step sizes in a grid). What is
built from them lives beside: the process and its optimizers
(`processes`), the task and each round's data (`round_data`), the output
folder (`outputs`), the execution ring (`launch`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff import personalization_data
from perfed_tff.data import registry
from perfed_tff.program import launch

CLIENT_WEIGHTINGS = ('uniform', 'num_examples')
# Upper ends of the meaningful ranges (beyond them a run never ends, or one
# batch alone needs gigabytes).
MAX_ROUNDS = 10**7
MAX_LOCAL_STEPS = 10**4
MAX_BATCH_SIZE = 10**6
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_INNER_STEPS = 100
SIDES = ('client', 'server')


def optimizer_fields(side: str) -> tuple[str, ...]:
  """The `TrainingConfig` fields of the client or server optimizer:
  `<side>_optimizer`, `<side>_learning_rate`, then
  `<side>_<optimizer>_<hyperparameter>` of every optimizer of
  `perfed_tff.algorithms.OPTIMIZERS` (`client_sgd_momentum`,
  `client_adam_beta_1`, ...)."""
  return (f'{side}_optimizer', f'{side}_learning_rate') + tuple(
      f'{side}_{name}_{hparam}'
      for name, (_, hparams) in algorithms.OPTIMIZERS.items()
      for hparam in hparams)


OPTIMIZER_FIELDS = optimizer_fields('client') + optimizer_fields('server')
# Settings a checkpoint must share with the run that resumes it. The
# optimizer settings are recorded as null at their defaults
# (`resume_metadata`): checkpoints written before they existed lack them, and
# still resume with the defaults (today's optimizers), not with others.
RESUME_KEYS = ('algorithm', 'dataset', 'dataset_options', 'alpha', 'beta',
               'delta', 'local_steps', 'inner_steps', 'batch_size',
               'clients_per_round', 'seed',
               'client_weighting') + OPTIMIZER_FIELDS
# The longest `experiment_name` (one folder name).
MAX_NAME_LENGTH = 255


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Arguments of one training run (one flag each in the binaries).

  algorithm: one of `perfed_tff.algorithms.ALGORITHMS`.
  dataset, dataset_options, cache_dir: `perfed_tff.data.registry.load_task`.
  inner_steps: nu, SGD steps at alpha inside Per-FedAvg's meta-objective
    (1: the paper; `perfed_tff.build_per_fedavg(inner_steps=)`).
  rounds, clients_per_round, alpha, beta, delta, local_steps, batch_size,
    client_weighting: the algorithm (`perfed_tff.algorithms.build_algorithm`).
  client_optimizer, server_optimizer: one of
    `perfed_tff.algorithms.OPTIMIZERS` ('sgd', 'adam', 'adamw', 'adagrad',
    'yogi', 'rmsprop': `tff.learning.optimizers.build_<name>`, 'sgd' being
    `build_sgdm`). The client optimizer applies each local step's direction
    (Per-FedAvg's meta-gradient, FedAvg's gradient), its state fresh every
    round; the server optimizer applies the averaged client update.
  client_learning_rate: the client optimizer's learning rate; None: `beta`
    (beta is the default client learning rate; giving both is a clash).
  server_learning_rate: the server optimizer's learning rate (1.0 with SGD:
    the new global model is the average of the client models).
  client_<optimizer>_<hparam>, server_<optimizer>_<hparam>: the
    hyperparameters of the chosen optimizer (`client_sgd_momentum`,
    `client_adam_beta_1`, ..., the builder's arguments); None: the builder's
    default. Those of an optimizer not chosen must stay None. With the
    defaults (SGD without momentum at beta, SGD at 1.0) a run computes what
    it computed before these settings existed, bit for bit.
  seed: data split, model initialization, client sampling, batch shuffling.
  root_output_dir: outputs go to `<root_output_dir>/<experiment_name>/
    <algorithm>/` (`<root_output_dir>/<algorithm>/` without a name).
  experiment_name: a folder name grouping runs; '' (the default): none.
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
  runtime: where the run's computations run (`perfed_tff.program.launch`):
    'tff' (the default: the current TFF context, TFF's own unless you set
    another; public TFF only), 'owned' (`perfed_tff.runtime`: a context
    whose worker this library starts, supervises and stops) or
    'accelerated' (that context with `perfed_tff.accelerator`; what the
    binaries use). The same weights and metrics in all three; 'owned' and
    'accelerated' need the TFF version the outer ring was written for.
  workers: 'host:port' of running TFF workers; empty: one local worker
    (runtime 'owned' or 'accelerated').
  worker_timeout: seconds to wait for an unreachable worker (and for a
    worker to answer a health check); runtime 'owned' or 'accelerated'.
  graph_optimization: where Grappler optimizes the TFF graphs
    (`perfed_tff.accelerator.compilation`; runtime 'accelerated'). Speed
    only.
  progress: show a progress bar (else one log line per round).
  round_timeout: seconds a training round (or checkpoint write) may take
    before the run stops; evaluations get 10x. 0: derived from the measured
    rounds (`perfed_tff.runtime.supervision`; runtime 'owned' or
    'accelerated').
  rounds_per_invocation: training rounds run in one TFF invocation, at most
    (`perfed_tff.accelerator.round_blocks`; never past a checkpoint or
    evaluation round; runtime 'accelerated'). 0: chosen by the program (up
    to 10 under the accelerator, else 1); 1: one round per invocation.
    Speed only: the results are the same.
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
  inner_steps: int = 1
  batch_size: int = 10
  client_weighting: str = 'uniform'
  client_optimizer: str = 'sgd'
  client_learning_rate: Optional[float] = None
  server_optimizer: str = 'sgd'
  server_learning_rate: float = 1.0
  # The optimizers' hyperparameters (`optimizer_fields`), None: the
  # builder's default.
  client_sgd_momentum: Optional[float] = None
  client_adam_beta_1: Optional[float] = None
  client_adam_beta_2: Optional[float] = None
  client_adam_epsilon: Optional[float] = None
  client_adamw_beta_1: Optional[float] = None
  client_adamw_beta_2: Optional[float] = None
  client_adamw_epsilon: Optional[float] = None
  client_adamw_weight_decay: Optional[float] = None
  client_adagrad_initial_preconditioner_value: Optional[float] = None
  client_adagrad_epsilon: Optional[float] = None
  client_yogi_beta_1: Optional[float] = None
  client_yogi_beta_2: Optional[float] = None
  client_yogi_epsilon: Optional[float] = None
  client_yogi_initial_preconditioner_value: Optional[float] = None
  client_rmsprop_decay: Optional[float] = None
  client_rmsprop_epsilon: Optional[float] = None
  server_sgd_momentum: Optional[float] = None
  server_adam_beta_1: Optional[float] = None
  server_adam_beta_2: Optional[float] = None
  server_adam_epsilon: Optional[float] = None
  server_adamw_beta_1: Optional[float] = None
  server_adamw_beta_2: Optional[float] = None
  server_adamw_epsilon: Optional[float] = None
  server_adamw_weight_decay: Optional[float] = None
  server_adagrad_initial_preconditioner_value: Optional[float] = None
  server_adagrad_epsilon: Optional[float] = None
  server_yogi_beta_1: Optional[float] = None
  server_yogi_beta_2: Optional[float] = None
  server_yogi_epsilon: Optional[float] = None
  server_yogi_initial_preconditioner_value: Optional[float] = None
  server_rmsprop_decay: Optional[float] = None
  server_rmsprop_epsilon: Optional[float] = None
  seed: int = 0
  root_output_dir: str = '/tmp/perfed_tff'
  experiment_name: str = ''
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  eval_every: int = 10
  eval_clients: int = 100
  eval_steps: Sequence[int] = (1,)
  eval_protocols: Sequence[str] = ('heldout',)
  adapt_batch_size: Optional[int] = None
  runtime: str = 'tff'
  workers: Sequence[str] = ()
  worker_timeout: float = 30.0
  graph_optimization: str = 'auto'
  progress: bool = True
  round_timeout: float = 0.0
  rounds_per_invocation: int = 0

  def resume_metadata(self) -> dict:
    """The settings a checkpoint records and a resumed run must match. An
    optimizer setting at its default is recorded as None, as a checkpoint
    written before the setting existed reads (it lacks the key)."""
    out = {k: getattr(self, k) for k in RESUME_KEYS}
    out['dataset_options'] = json.loads(
        json.dumps(dict(self.dataset_options), sort_keys=True))
    for k in OPTIMIZER_FIELDS:
      if out[k] == _FIELD_DEFAULTS[k]:
        out[k] = None
    return out

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def to_hparams(self) -> dict:
    """Every setting, flat (one CSV row, as TFF research binaries write
    `hparams.csv`): lists joined by ',', dataset options as their flag
    (`key=value,...`), None as ''."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == 'dataset_options':
        value = ','.join(f'{k}={v}' for k, v in sorted(dict(value).items()))
      elif isinstance(value, (list, tuple)):
        value = ','.join(str(v) for v in value)
      out[field.name] = '' if value is None else value
    return out

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name,
                        self.algorithm)

  @property
  def effective_adapt_batch_size(self) -> int:
    return self.adapt_batch_size or self.batch_size


def validate(config: TrainingConfig) -> TrainingConfig:
  """Checks every field that can be checked without data; returns the
  normalized config. A config this returned is not checked again (a copy
  made with `dataclasses.replace` is). What needs the data or the disk is
  checked where the run has them (`round_data.check_population`,
  `outputs.check_output_paths`, by `training_loop.run_training`).

  Raises:
    checks.ArgumentError: the first bad field (named as its parameter).
  """
  if _VALIDATED in vars(config):
    return config
  algorithms.check_algorithm(config.algorithm)
  checks.choice('dataset', config.dataset, registry.DATASETS)
  checks.choice('client_weighting', config.client_weighting,
                CLIENT_WEIGHTINGS)
  runtime = launch.check_runtime(config.runtime)
  adapt = config.adapt_batch_size
  changes = dict(
      alpha=checks.step_size('alpha', config.alpha),
      beta=checks.step_size('beta', config.beta),
      delta=checks.step_size('delta', config.delta),
      rounds=checks.at_most('rounds', checks.integer('rounds', config.rounds,
                                                     1), MAX_ROUNDS),
      clients_per_round=checks.integer('clients_per_round',
                                       config.clients_per_round, 1),
      local_steps=checks.at_most(
          'local_steps', checks.integer('local_steps', config.local_steps, 1),
          MAX_LOCAL_STEPS),
      inner_steps=checks.at_most(
          'inner_steps', algorithms.check_inner_steps(config.algorithm,
                                                      config.inner_steps),
          MAX_INNER_STEPS),
      batch_size=checks.at_most(
          'batch_size', checks.integer('batch_size', config.batch_size, 1),
          MAX_BATCH_SIZE),
      seed=checks.integer('seed', config.seed, 0, 2**32 - 1),
      checkpoint_every=checks.integer('checkpoint_every',
                                      config.checkpoint_every, 1),
      keep_checkpoints=checks.integer('keep_checkpoints',
                                      config.keep_checkpoints, 1),
      eval_every=checks.integer('eval_every', config.eval_every, 0),
      eval_clients=checks.integer('eval_clients', config.eval_clients, 0),
      eval_steps=checks.int_list('eval_steps', config.eval_steps, 1,
                                 MAX_LOCAL_STEPS),
      eval_protocols=_protocols(config.eval_protocols),
      adapt_batch_size=(None if adapt is None else checks.at_most(
          'adapt_batch_size', checks.integer('adapt_batch_size', adapt, 1),
          MAX_BATCH_SIZE)),
      worker_timeout=checks.bounded_float('worker_timeout',
                                          config.worker_timeout, 0.1,
                                          MAX_TIMEOUT),
      round_timeout=(0.0 if config.round_timeout == 0 else
                     checks.bounded_float('round_timeout',
                                          config.round_timeout, 1.0,
                                          MAX_TIMEOUT)),
      workers=checks.worker_addresses('workers', config.workers),
      rounds_per_invocation=checks.integer(
          'rounds_per_invocation', config.rounds_per_invocation, 0),
      runtime=runtime,
      root_output_dir=checks.writable_dir('root_output_dir',
                                          config.root_output_dir),
      cache_dir=checks.existing_dir('cache_dir', config.cache_dir),
      dataset_options=checks.key_values('dataset_options',
                                        config.dataset_options),
      experiment_name=_experiment_name(config.experiment_name),
      **_optimizer_changes(config),
  )
  # Unknown or renamed option names fail now; option values are checked by
  # the dataset's loader (`load_task`).
  registry.check_options(config.dataset, changes['dataset_options'])
  config = dataclasses.replace(config, **changes)
  launch.check_runtime_settings(config)
  object.__setattr__(config, _VALIDATED, True)  # Not a field: not copied.
  return config


_VALIDATED = '_validated'
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingConfig)
                   if f.default is not dataclasses.MISSING}


def _experiment_name(value) -> str:
  """'' or one folder name."""
  if not isinstance(value, str):
    raise checks.ArgumentError('experiment_name',
                               f'must be a folder name, got {value!r}')
  if value and (value in ('.', '..') or '/' in value or os.sep in value
                or len(value) > MAX_NAME_LENGTH
                or any(ord(c) < 32 for c in value)):
    raise checks.ArgumentError(
        'experiment_name', 'must be one folder name (no "/", not "." or '
        f'"..", at most {MAX_NAME_LENGTH} characters), got {value!r}')
  return value


def _optimizer_changes(config: TrainingConfig) -> dict:
  """The checked optimizer settings of `config` (see `validate`)."""
  changes = {}
  for side in SIDES:
    chosen = checks.choice(f'{side}_optimizer',
                           getattr(config, f'{side}_optimizer'),
                           algorithms.OPTIMIZERS)
    for name, (_, hparams) in algorithms.OPTIMIZERS.items():
      for hparam in hparams:
        field = f'{side}_{name}_{hparam}'
        value = getattr(config, field)
        if value is None:
          continue
        if name != chosen:
          raise checks.ArgumentError(
              field, f'is a hyperparameter of the {name!r} optimizer, but '
              f'{side}_optimizer is {chosen!r}')
        changes[field] = algorithms.check_optimizer_hparam(hparam, value,
                                                           field)
  if config.client_learning_rate is not None:
    changes['client_learning_rate'] = checks.step_size(
        'client_learning_rate', config.client_learning_rate)
    if config.beta != _FIELD_DEFAULTS['beta']:
      raise checks.ArgumentError(
          'client_learning_rate', f'and beta={config.beta!r} both set the '
          'client learning rate (beta is its default); give only one')
  changes['server_learning_rate'] = checks.step_size(
      'server_learning_rate', config.server_learning_rate)
  return changes


def _protocols(value) -> tuple[str, ...]:
  items = value.split(',') if isinstance(value, str) else list(value)
  items = tuple(str(p).strip() for p in items if str(p).strip())
  if not items or len(set(items)) != len(items):
    raise checks.ArgumentError(
        'eval_protocols', f'must list distinct protocols, got {value!r}')
  for p in items:
    personalization_data.check_protocol(p)
  return items
