"""A run's `LearningProcess` from its settings: the algorithm, its model
and its optimizers.

Per-FedAvg trains the task's model as a `tff.learning.models.FunctionalModel`
(`task.functional_model()`: the same weights, math and metric names as
`task.model_fn`, but no model variables to create and initialize per client
and round), or as its `VariableModel` where it has no Keras model
(`per_fedavg_model`). FedAvg is `perfed_tff.fed_avg.build_fed_avg` on `task.model_fn`
(TFF's `build_weighted_fed_avg`), or its faster build under the accelerator
(`launch.fed_avg_builder`: the same process). The client and server
optimizers are the settings' (`build_optimizer`): SGD at beta and SGD at 1.0
by default, as the algorithms build them themselves.
"""

from __future__ import annotations

from perfed_tff import algorithms
from perfed_tff import per_fedavg
from perfed_tff.data import task as task_lib
from perfed_tff.program import launch


def learning_rate(config, side: str) -> float:
  """The learning rate of the client optimizer (`client_learning_rate`, by
  default `beta`) or of the server optimizer."""
  if side == 'client':
    return (config.beta if config.client_learning_rate is None
            else config.client_learning_rate)
  return config.server_learning_rate


def optimizer_hparams(config, side: str) -> dict:
  """{hyperparameter: value} given for the chosen optimizer of `side`
  (those left at None take the builder's defaults and are not listed)."""
  name = getattr(config, f'{side}_optimizer')
  return {hparam: getattr(config, f'{side}_{name}_{hparam}')
          for hparam in algorithms.optimizer_hparams(name)
          if getattr(config, f'{side}_{name}_{hparam}') is not None}


def is_default_optimizer(config, side: str) -> bool:
  """Whether `side` uses the algorithms' default optimizer: SGD without
  momentum at beta (client), SGD at 1.0 (server)."""
  if getattr(config, f'{side}_optimizer') != 'sgd' or optimizer_hparams(
      config, side):
    return False
  if side == 'client':
    return config.client_learning_rate is None
  return config.server_learning_rate == 1.0


def build_optimizer(config, side: str):
  """The `tff.learning.optimizers.Optimizer` of `side` ('client' or
  'server'), or None for the default optimizer (`is_default_optimizer`),
  which the algorithms build themselves from beta (so a run with the
  defaults builds exactly what it built before these settings existed)."""
  if is_default_optimizer(config, side):
    return None
  return algorithms.build_optimizer(
      getattr(config, f'{side}_optimizer'), learning_rate(config, side),
      prefix=f'{side}_', **optimizer_hparams(config, side))


def per_fedavg_model(task: task_lib.FederatedTask):
  """The task's model as Per-FedAvg trains it: its `FunctionalModel`, or
  its `model_fn` (a `VariableModel`) where none can be made (a TFF baseline
  task, whose Keras model TFF's public API does not give)."""
  try:
    return task.functional_model()
  except TypeError:
    return task.model_fn


def build_process(config, task: task_lib.FederatedTask):
  """The `LearningProcess` of a run of `config` (a `TrainingConfig`) on
  `task`."""
  # None: the algorithm's default (SGD at beta; SGD at 1.0), as before the
  # optimizer settings existed.
  client_optimizer = build_optimizer(config, 'client')
  kwargs = dict(
      beta=config.beta if client_optimizer is None else None,
      client_optimizer_fn=client_optimizer,
      server_optimizer_fn=build_optimizer(config, 'server'),
      client_weighting=config.client_weighting)
  variant = algorithms.variant_of(config.algorithm)
  if variant is None:
    return launch.fed_avg_builder(config)(task, **kwargs)
  return per_fedavg.build_per_fedavg(
      per_fedavg_model(task), variant=variant, alpha=config.alpha,
      delta=config.delta, local_steps=config.local_steps,
      inner_steps=config.inner_steps, **kwargs)
