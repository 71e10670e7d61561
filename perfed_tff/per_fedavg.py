"""`build_per_fedavg`: Per-FedAvg as a `tff.learning.templates.LearningProcess`.

Personalized Federated Averaging: Fallah, Mokhtari & Ozdaglar, "Personalized
Federated Learning with Theoretical Guarantees: A Model-Agnostic
Meta-Learning Approach", NeurIPS 2020, https://arxiv.org/abs/2002.07948.

Composed like `tff.learning.algorithms.build_weighted_fed_avg`: broadcast the
global model w, run Per-FedAvg client work (tau local MAML steps, see
`perfed_tff.per_fedavg_client_work`), aggregate the client updates w - w_i with a weighted
`tff.aggregators` factory (mean by default) and apply them with the server
optimizer (default plain SGD at learning rate 1, so the new global model is
the (weighted) average of the client models, sum_i p_i w_i with
sum_i p_i = 1). Non-finite aggregates are rejected by the finalizer and leave
w unchanged. Hyperparameters (alpha, delta, the client and server optimizer
hyperparameters) live in the process state (`get_hparams`/`set_hparams`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import per_fedavg_client_work as client_work_lib
from perfed_tff import per_fedavg_step as step_lib
from perfed_tff import process_arguments as args_lib

ClientWeighting = tff.learning.ClientWeighting


def check_variant(variant) -> step_lib.Variant:
  """'fo' | 'hf' | 'maml' (any case) or a `Variant` -> `Variant`."""
  try:
    return step_lib.Variant(
        variant.lower() if isinstance(variant, str) else variant)
  except ValueError:
    raise checks.ArgumentError(
        'variant', f'must be one of {[v.value for v in step_lib.Variant]}'
        f', got {variant!r}') from None


def build_per_fedavg(
    model_fn: client_work_lib.ModelFn,
    *,
    variant: Union[str, step_lib.Variant],
    alpha: float,
    beta: Optional[float] = None,
    delta: float = 1e-3,
    local_steps: int,
    inner_steps: int = 1,
    client_optimizer_fn: Optional[args_lib.OptimizerArg] = None,
    server_optimizer_fn: Optional[args_lib.OptimizerArg] = None,
    client_weighting: Union[str, ClientWeighting] = ClientWeighting.UNIFORM,
    model_distributor: Optional[tff.learning.templates.DistributionProcess] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
) -> tff.learning.templates.LearningProcess:
  """Builds Personalized Federated Averaging (Fallah et al., 2020).

  Each sampled client runs tau = `local_steps` MAML steps from the global model
  w: w~ = w - alpha g_D(w), then w <- w - beta * (meta-gradient at w~ on D'),
  with the Hessian term on D'' for HF/MAML (see
  `perfed_tff.per_fedavg_client_work`). With `inner_steps` nu > 1 the
  meta-objective is the loss after nu SGD steps at alpha (Jamali et al.,
  2025, https://arxiv.org/abs/2504.21327):
  grad F(w) = prod_j (I - alpha H_j) g_D'(w_nu).
  `client_optimizer_fn` replaces "w <- w - beta * meta-gradient" by its own
  step on the meta-gradient. The server aggregates the client updates
  Delta_i = w - w_i (weighted mean by default) and applies the aggregate
  with `server_optimizer_fn` (default SGD at 1.0: the new global model is
  the average of the client models, sum_i p_i w_i).

  Hyperparameters live in the process state, as in TFF:
  `process.get_hparams(state)` is
  `OrderedDict(client_work=OrderedDict(alpha, delta,
  client_optimizer=<client optimizer hparams, e.g. learning_rate = beta>),
  finalizer=<server optimizer hparams>)` and
  `process.set_hparams(state, hparams)` changes them for the next rounds
  without rebuilding or retracing anything.

  Client data: a `tf.data.Dataset` of batches; local step t consumes the next
  nu + 1 (FO) or 2 nu + 1 (HF, MAML) batches in order (2 or 3 for nu = 1).

  Args:
    model_fn: a no-arg callable returning a `tff.learning.models.VariableModel`,
      or a `tff.learning.models.FunctionalModel` (as accepted by
      `tff.learning.algorithms.build_weighted_fed_avg`).
    variant: 'fo', 'hf' or 'maml'.
    alpha: inner (personalization) step size, > 0 (initial value; in state).
    beta: outer (meta) step size of the default client optimizer (SGD at
      beta), > 0; required unless `client_optimizer_fn` is given, and not
      allowed with it.
    delta: finite-difference radius of HF, > 0 (unused by FO and MAML).
    local_steps: tau, local steps per round, an int >= 1.
    inner_steps: nu, SGD steps at alpha inside the meta-objective, an int
      >= 1 (1: the paper's Per-FedAvg).
    client_optimizer_fn: a `tff.learning.optimizers.Optimizer` (or a no-arg
      callable returning one) applying the meta-gradient on the client; its
      state starts afresh every round. Default SGD at `beta`.
    server_optimizer_fn: the same, applying the aggregated update on the
      server (state kept across rounds). Default SGD at 1.0.
    client_weighting: 'uniform' (the paper: every client model counts
      equally) or 'num_examples' (weight = examples the client consumed), or
      the matching `tff.learning.ClientWeighting`.
    model_distributor: a `tff.learning.templates.DistributionProcess`;
      default `tff.learning.templates.build_broadcast_process`.
    model_aggregator: a `tff.aggregators` factory for the client updates:
      weighted factories as they are (default `MeanFactory()`), unweighted
      mean-like ones (DP, robust, compression) through
      `tff.aggregators.as_weighted_aggregator`; sums raise `TypeError`.
    metrics_aggregator: like `tff.learning.metrics.sum_then_finalize` (the
      default) or `secure_sum_then_finalize`: called with (a callable
      finalizing all metrics, the unfinalized metrics type).

  Returns:
    A `tff.learning.templates.LearningProcess` with `initialize`, `next`,
    `get_model_weights`, `set_model_weights`, `get_hparams` and
    `set_hparams`. Training metrics (`metrics['client_work']['train']`):
    `loss`, `personalized_loss` (NaN in a round where no client update was
    usable: every client non-finite or without a step, or no clients),
    `num_examples`, `num_steps`, `num_clients_without_step`,
    `num_non_finite_updates` and the model's own metrics at w on D (e.g.
    `sparse_categorical_accuracy`) and at w~ on D'
    (`personalized_sparse_categorical_accuracy`).
    It runs in any TFF execution context (TFF's own default, or the
    optional `perfed_tff.runtime.ExecutionContext`).

  Raises:
    ValueError: on an unknown variant or client weighting, alpha/beta/delta
      not a step size (`checks.step_size`), local_steps or inner_steps < 1, beta missing (or given with a
      client optimizer: `process_arguments.check_client_optimizer`, the rule
      `perfed_tff.algorithms.build_algorithm` applies to every algorithm).
    TypeError: a bad model_fn, optimizer, distributor or aggregator (an
      unweighted sum factory included).
  """
  variant = check_variant(variant)
  alpha = checks.step_size('alpha', alpha)
  delta = checks.step_size('delta', delta)
  local_steps = checks.integer('local_steps', local_steps, 1)
  inner_steps = checks.integer('inner_steps', inner_steps, 1)
  client_weighting = args_lib.check_weighting(client_weighting)
  client_optimizer = args_lib.check_client_optimizer(beta, client_optimizer_fn)
  server_optimizer = args_lib.check_server_optimizer(server_optimizer_fn)
  args_lib.check_metrics_aggregator(metrics_aggregator)
  args_lib.check_distributor(model_distributor)

  initial_weights_fn = args_lib.initial_model_weights_computation(model_fn)
  model_weights_type = initial_weights_fn.type_signature.result
  distributor = (model_distributor or
                 tff.learning.templates.build_broadcast_process(
                     model_weights_type))
  aggregator = args_lib.weighted_aggregation_process(
      model_aggregator, model_weights_type.trainable)
  client_work = client_work_lib.build_per_fedavg_client_work(
      model_fn, model_weights_type, variant=variant, alpha=alpha,
      delta=delta, local_steps=local_steps, inner_steps=inner_steps,
      client_optimizer=client_optimizer,
      uniform_weighting=client_weighting is ClientWeighting.UNIFORM,
      metrics_aggregator=metrics_aggregator)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, model_weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights_fn, distributor, client_work, aggregator, finalizer)
