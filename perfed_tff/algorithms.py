"""The algorithms an experiment can name: their rules and `LearningProcess`es.

An algorithm name decides its Per-FedAvg variant (`variant_of`), the batches
a client consumes per round (`batches_per_round`) and its gradient
evaluations (`gradient_evaluations_per_round`); `build_algorithm` builds it.

`fedavg` is TFF's own `tff.learning.algorithms.build_weighted_fed_avg` with
client SGD at learning rate beta for tau local steps and server SGD at 1.0 (the
server takes the average of the client models), so every baseline is TFF's.
Its client loop is TFF's DATASET_ITERATOR: the same steps as TFF's default
DATASET_REDUCE loop, and the faster of the two on CPU under either
compilation (EMNIST CNN rounds: 0.68-0.71 s against 0.98-1.20 s,
`experiments/benchmark.py --compilation_ab`), so no ratio against FedAvg
rests on a slow baseline.
`per_fedavg_{fo,hf,maml}` are `perfed_tff.build_per_fedavg` with the same
alpha, beta, tau and weighting.
"""

from __future__ import annotations

from typing import Union

import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import per_fedavg as per_fedavg_lib
from perfed_tff import per_fedavg_client_work as client_work_lib

ALGORITHMS = ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml')


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


def variant_of(algorithm: str) -> client_work_lib.Variant | None:
  """The Per-FedAvg variant of an algorithm name (None for fedavg)."""
  check_algorithm(algorithm)
  if algorithm == 'fedavg':
    return None
  return client_work_lib.Variant(algorithm[len('per_fedavg_'):])


def batches_per_round(algorithm: str, local_steps: int, *,
                      inner_steps: int = 1) -> int:
  """Batches a client consumes in one round: tau for FedAvg; for Per-FedAvg
  tau (nu + 1) (FO) or tau (2 nu + 1) (HF, MAML), nu = `inner_steps` (2 tau
  and 3 tau for the paper's nu = 1)."""
  variant = variant_of(algorithm)
  if variant is None:
    return local_steps
  return client_work_lib.batches_per_step(variant, inner_steps) * local_steps


def gradient_evaluations_per_round(algorithm: str, local_steps: int, *,
                                   inner_steps: int = 1) -> int:
  """Batch gradient evaluations of one client in one round: tau for FedAvg;
  for Per-FedAvg tau (nu + 1) (FO), tau (3 nu + 1) (HF) or tau (2 nu + 1)
  (MAML) (`per_fedavg_client_work.gradient_evaluations_per_step`)."""
  variant = variant_of(algorithm)
  if variant is None:
    return local_steps
  return (client_work_lib.gradient_evaluations_per_step(variant, inner_steps)
          * local_steps)


def build_algorithm(
    algorithm: str,
    model_fn,
    *,
    alpha: float,
    beta: float,
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

  For fedavg, alpha and delta are unused in training (alpha is the step of the
  personalized evaluation); the client takes tau SGD steps at beta (or with
  `client_optimizer_fn`), and inner_steps must be 1. For Per-FedAvg, a given
  `client_optimizer_fn` replaces SGD at beta. The model aggregator follows
  `perfed_tff.per_fedavg.check_model_aggregator` for every algorithm
  (unweighted means adapted, sums rejected).
  """
  variant = variant_of(algorithm)
  if variant is not None:
    return per_fedavg_lib.build_per_fedavg(
        model_fn, variant=variant, alpha=alpha,
        beta=None if client_optimizer_fn is not None else beta, delta=delta,
        local_steps=local_steps, inner_steps=inner_steps,
        client_weighting=client_weighting,
        client_optimizer_fn=client_optimizer_fn,
        server_optimizer_fn=server_optimizer_fn,
        model_distributor=model_distributor,
        model_aggregator=model_aggregator,
        metrics_aggregator=metrics_aggregator)
  # Same validation as Per-FedAvg, so a bad flag fails the same way.
  checks.positive_float('alpha', alpha)
  beta = checks.positive_float('beta', beta)
  checks.integer('local_steps', local_steps, 1)
  checks.integer('inner_steps', inner_steps, 1, 1)
  client_optimizer = (
      tff.learning.optimizers.build_sgdm(learning_rate=beta)
      if client_optimizer_fn is None else
      per_fedavg_lib.check_optimizer('client_optimizer_fn', client_optimizer_fn))
  server_optimizer = (
      tff.learning.optimizers.build_sgdm(learning_rate=1.0)
      if server_optimizer_fn is None else
      per_fedavg_lib.check_optimizer('server_optimizer_fn', server_optimizer_fn))
  return tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=client_optimizer,
      server_optimizer_fn=server_optimizer,
      client_weighting=per_fedavg_lib.check_weighting(client_weighting),
      model_distributor=model_distributor,
      model_aggregator=(None if model_aggregator is None else
                        per_fedavg_lib.check_model_aggregator(
                            model_aggregator)),
      metrics_aggregator=metrics_aggregator,
      loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
