"""`build_fed_avg`: the FedAvg baseline, TFF's own weighted FedAvg.

Federated Averaging: McMahan, Moore, Ramage, Hampson & Aguera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, https://arxiv.org/abs/1602.05629.

The round is `tff.learning.algorithms.build_weighted_fed_avg`'s: broadcast the
global model w, each client takes one step of its optimizer per batch of its
data from w (the library's batches: tau of them, `perfed_tff.data.task`) and
sends Delta_i = w - w_i, the server applies the weighted mean of the Delta_i
with its optimizer (SGD at 1.0: the new model is sum_i p_i w_i). It takes
its arguments by the rules of `build_per_fedavg`
(`perfed_tff.process_arguments`), and its client loop is TFF's
DATASET_ITERATOR: the same steps as TFF's default DATASET_REDUCE loop, which
TFF 0.87 cannot run on a `FunctionalModel`.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import tensorflow_federated as tff

from perfed_tff import process_arguments as args_lib


def weighted_fed_avg_arguments(
    *,
    beta: Optional[float] = None,
    client_optimizer_fn: Optional[args_lib.OptimizerArg] = None,
    server_optimizer_fn: Optional[args_lib.OptimizerArg] = None,
    client_weighting: Union[str, tff.learning.ClientWeighting] = 'uniform',
    model_distributor: Optional[
        tff.learning.templates.DistributionProcess] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    metrics_aggregator: Optional[Callable[..., tff.Computation]] = None,
) -> dict:
  """The keyword arguments of `tff.learning.algorithms.build_weighted_fed_avg`
  for `build_fed_avg`'s (see there), checked by the library's rules."""
  client_weighting = args_lib.check_weighting(client_weighting)
  client_optimizer = args_lib.check_client_optimizer(beta, client_optimizer_fn)
  server_optimizer = args_lib.check_server_optimizer(server_optimizer_fn)
  args_lib.check_distributor(model_distributor)
  args_lib.check_metrics_aggregator(metrics_aggregator)
  if model_aggregator is not None:
    model_aggregator = args_lib.check_model_aggregator(model_aggregator)
  return dict(
      client_optimizer_fn=client_optimizer,
      server_optimizer_fn=server_optimizer,
      client_weighting=client_weighting,
      model_distributor=model_distributor,
      model_aggregator=model_aggregator,
      metrics_aggregator=metrics_aggregator,
      loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)


def build_fed_avg(model_fn, **kwargs) -> tff.learning.templates.LearningProcess:
  """TFF's weighted FedAvg, with client SGD at `beta` by default.

  Args:
    model_fn: what `build_weighted_fed_avg` takes: a no-arg callable
      returning a `tff.learning.models.VariableModel` (the client
      optimizer's hyperparameters are then in the process state,
      `get_hparams`/`set_hparams`), or a `FunctionalModel` (TFF keeps them
      out of the state).
    **kwargs: `weighted_fed_avg_arguments`':
      beta: the learning rate of the default client optimizer (SGD), > 0;
        required unless `client_optimizer_fn` is given, and not allowed
        with it (`process_arguments.check_client_optimizer`).
      client_optimizer_fn, server_optimizer_fn: `tff.learning.optimizers`
        optimizers (or no-arg callables returning one); the server's
        default is SGD at 1.0 (the new global model is the average of the
        client models).
      client_weighting: 'uniform' (default), 'num_examples' or a
        `tff.learning.ClientWeighting`.
      model_distributor, model_aggregator, metrics_aggregator: as in
        `build_weighted_fed_avg`; unweighted mean-like aggregators are
        adapted and sums refused (`process_arguments.check_model_aggregator`).

  Returns:
    `tff.learning.algorithms.build_weighted_fed_avg`'s `LearningProcess`.
  """
  return tff.learning.algorithms.build_weighted_fed_avg(
      model_fn, **weighted_fed_avg_arguments(**kwargs))
