"""The algorithms an experiment can name: their rules and `LearningProcess`es.

An algorithm name decides its Per-FedAvg variant (`variant_of`), the batches
a client consumes per round (`batches_per_round`) and its gradient
evaluations (`gradient_evaluations_per_round`); `build_algorithm` builds it
by name.

`fedavg` is TFF's weighted FedAvg (`perfed_tff.fed_avg.build_fed_avg`:
`tff.learning.algorithms.build_weighted_fed_avg`) with client SGD at
learning rate beta, one step per batch of the tau it is given, and server SGD
at 1.0 (the server takes the average of the client models).
`per_fedavg_{fo,hf,maml}` are `perfed_tff.build_per_fedavg` with the same
alpha, beta, tau and weighting.

Every algorithm takes its arguments by one rule
(`perfed_tff.process_arguments`: `build_algorithm` and `build_per_fedavg`
accept and reject the same things): beta is the learning rate of the default
client SGD, required without `client_optimizer_fn` and rejected with it;
alpha and delta are step sizes (`checks.step_size`); `inner_steps` is
Per-FedAvg's nu, so FedAvg takes only 1 (`check_inner_steps`).

`OPTIMIZERS` names the `tff.learning.optimizers` builders a run can pick by
name, with the hyperparameters each takes besides its learning rate;
`build_optimizer` builds one.
"""

from __future__ import annotations

from typing import Optional, Union

import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import fed_avg
from perfed_tff import per_fedavg as per_fedavg_lib
from perfed_tff import per_fedavg_step as step_lib

ALGORITHMS = ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml')

# name -> (`tff.learning.optimizers` builder, its hyperparameters besides
# the learning rate, in the builder's order). 'sgd' is `build_sgdm` (plain
# SGD without a momentum, SGD with momentum with one). Not offered:
# `build_adafactor`, whose relative step (on by default) replaces the
# learning rate.
OPTIMIZERS = {
    'sgd': (tff.learning.optimizers.build_sgdm, ('momentum',)),
    'adam': (tff.learning.optimizers.build_adam,
             ('beta_1', 'beta_2', 'epsilon')),
    'adamw': (tff.learning.optimizers.build_adamw,
              ('beta_1', 'beta_2', 'epsilon', 'weight_decay')),
    'adagrad': (tff.learning.optimizers.build_adagrad,
                ('initial_preconditioner_value', 'epsilon')),
    'yogi': (tff.learning.optimizers.build_yogi,
             ('beta_1', 'beta_2', 'epsilon', 'initial_preconditioner_value')),
    'rmsprop': (tff.learning.optimizers.build_rmsprop, ('decay', 'epsilon')),
}
# The largest meaningful epsilon, weight decay or initial preconditioner.
MAX_OPTIMIZER_HPARAM = 1e6


def check_algorithm(algorithm: str, name: str = 'algorithm') -> str:
  """`algorithm` if it is one of ALGORITHMS, else `ArgumentError`."""
  return checks.choice(name, algorithm, ALGORITHMS)


def parse_algorithms(value, name: str = 'algorithms') -> tuple[str, ...]:
  """'fedavg,per_fedavg_hf' (or a sequence) -> distinct checked names."""
  items = value.split(',') if isinstance(value, str) else list(value)
  items = [str(a).strip() for a in items if str(a).strip()]
  if not items:
    raise checks.ArgumentError(name, f'must name at least one of '
                               f'{list(ALGORITHMS)}')
  for a in items:
    check_algorithm(a, name)
  if len(set(items)) != len(items):
    raise checks.ArgumentError(name, f'lists an algorithm more than once: '
                               f'{items}')
  return tuple(items)


def variant_of(algorithm: str) -> step_lib.Variant | None:
  """The Per-FedAvg variant of an algorithm name (None for fedavg)."""
  check_algorithm(algorithm)
  if algorithm == 'fedavg':
    return None
  return step_lib.Variant(algorithm[len('per_fedavg_'):])


def check_inner_steps(algorithm: str, inner_steps) -> int:
  """`inner_steps` (nu) of `algorithm`: an int >= 1 for Per-FedAvg; FedAvg
  has no inner steps, so only 1 (its default) is accepted.

  Raises:
    checks.ArgumentError (inner_steps): out of range, or not 1 for FedAvg.
  """
  inner_steps = checks.integer('inner_steps', inner_steps, 1)
  if variant_of(algorithm) is None and inner_steps != 1:
    raise checks.ArgumentError(
        'inner_steps', "must be 1 for fedavg (inner steps are Per-FedAvg's "
        f'nu; FedAvg takes none), got {inner_steps!r}')
  return inner_steps


def optimizer_hparams(optimizer: str, name: str = 'optimizer') -> tuple:
  """The hyperparameters of optimizer `optimizer` (one of OPTIMIZERS)
  besides its learning rate, e.g. ('beta_1', 'beta_2', 'epsilon')."""
  return OPTIMIZERS[checks.choice(name, optimizer, OPTIMIZERS)][1]


def check_optimizer_hparam(hparam: str, value, name: str = None) -> float:
  """`value` of optimizer hyperparameter `hparam` in its meaningful range:
  momentum, beta_1, beta_2, decay in [0, 1) (at 1 the moving averages stop
  moving, and Adam's bias correction divides by 0); epsilon, weight_decay,
  initial_preconditioner_value in [0, MAX_OPTIMIZER_HPARAM]. `name`: the
  parameter named in the error (default `hparam`)."""
  name = name or hparam
  if hparam in ('momentum', 'beta_1', 'beta_2', 'decay'):
    return checks.bounded_float(name, value, 0.0, 1.0, high_open=True)
  return checks.bounded_float(name, value, 0.0, MAX_OPTIMIZER_HPARAM)


def build_optimizer(optimizer: str, learning_rate: float, *,
                    prefix: str = '',
                    **hparams) -> tff.learning.optimizers.Optimizer:
  """`tff.learning.optimizers.build_<optimizer>(learning_rate, **hparams)`.

  Args:
    optimizer: one of OPTIMIZERS ('sgd' is `build_sgdm`).
    learning_rate: a float32-safe step size (`checks.step_size`).
    prefix: prefixes the parameters named in errors: `<prefix>optimizer`,
      `<prefix>learning_rate` and `<prefix><optimizer>_<hparam>` (e.g.
      'client_' -> `client_adam_beta_1`).
    **hparams: the optimizer's hyperparameters (`optimizer_hparams`); one
      left out or None takes the builder's default.

  Raises:
    checks.ArgumentError: an unknown optimizer, a learning rate or
      hyperparameter out of range, or a hyperparameter this optimizer does
      not take.
  """
  names = optimizer_hparams(optimizer, f'{prefix}optimizer')
  builder = OPTIMIZERS[optimizer][0]
  learning_rate = checks.step_size(f'{prefix}learning_rate', learning_rate)
  kwargs = {}
  for hparam, value in hparams.items():
    name = f'{prefix}{optimizer}_{hparam}'
    if hparam not in names:
      raise checks.ArgumentError(
          name, f'is not a hyperparameter of {optimizer!r} (it takes '
          f'{list(names)})')
    if value is not None:
      kwargs[hparam] = check_optimizer_hparam(hparam, value, name)
  return builder(learning_rate, **kwargs)


def batches_per_round(algorithm: str, local_steps: int, *,
                      inner_steps: int = 1) -> int:
  """Batches a client consumes in one round: tau for FedAvg; for Per-FedAvg
  tau (nu + 1) (FO) or tau (2 nu + 1) (HF, MAML), nu = `inner_steps` (2 tau
  and 3 tau for the paper's nu = 1)."""
  variant = variant_of(algorithm)
  if variant is None:
    return local_steps
  return step_lib.batches_per_step(variant, inner_steps) * local_steps


def gradient_evaluations_per_round(algorithm: str, local_steps: int, *,
                                   inner_steps: int = 1) -> int:
  """Batch gradient evaluations of one client in one round: tau for FedAvg;
  for Per-FedAvg tau (nu + 1) (FO), tau (3 nu + 1) (HF) or tau (2 nu + 1)
  (MAML) (`per_fedavg_step.gradient_evaluations_per_step`)."""
  variant = variant_of(algorithm)
  if variant is None:
    return local_steps
  return (step_lib.gradient_evaluations_per_step(variant, inner_steps)
          * local_steps)


def build_algorithm(
    algorithm: str,
    model_fn,
    *,
    alpha: float,
    beta: Optional[float] = None,
    delta: float = 1e-3,
    local_steps: int,
    client_weighting: Union[str, tff.learning.ClientWeighting] = 'uniform',
    model_aggregator=None,
    inner_steps: int = 1,
    client_optimizer_fn=None,
    server_optimizer_fn=None,
    model_distributor=None,
    metrics_aggregator=None,
) -> tff.learning.templates.LearningProcess:
  """Builds `algorithm` (one of ALGORITHMS) for `model_fn`.

  Every algorithm takes its arguments by `build_per_fedavg`'s rules
  (`perfed_tff.process_arguments`). For fedavg, alpha and delta are checked
  but unused in training (alpha is the step of the personalized
  evaluation), local_steps too (the client takes one step per batch it is
  given: `batches_per_round`), and `inner_steps` must be 1
  (`check_inner_steps`); it is `perfed_tff.fed_avg.build_fed_avg`.

  Raises:
    checks.ArgumentError: a bad argument, named (beta missing, or given with
      `client_optimizer_fn`; inner_steps other than 1 for fedavg; ...).
    TypeError: a bad model_fn, optimizer, distributor or aggregator.
  """
  variant = variant_of(algorithm)
  if variant is not None:
    return per_fedavg_lib.build_per_fedavg(
        model_fn, variant=variant, alpha=alpha, beta=beta, delta=delta,
        local_steps=local_steps, inner_steps=inner_steps,
        client_weighting=client_weighting,
        client_optimizer_fn=client_optimizer_fn,
        server_optimizer_fn=server_optimizer_fn,
        model_distributor=model_distributor,
        model_aggregator=model_aggregator,
        metrics_aggregator=metrics_aggregator)
  # The same checks as Per-FedAvg, so a bad argument fails the same way.
  checks.step_size('alpha', alpha)
  checks.step_size('delta', delta)
  checks.integer('local_steps', local_steps, 1)
  check_inner_steps(algorithm, inner_steps)
  return fed_avg.build_fed_avg(
      model_fn, beta=beta, client_optimizer_fn=client_optimizer_fn,
      server_optimizer_fn=server_optimizer_fn,
      client_weighting=client_weighting,
      model_distributor=model_distributor,
      model_aggregator=model_aggregator,
      metrics_aggregator=metrics_aggregator)
