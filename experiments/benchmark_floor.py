"""The benchmark's pure-TF floor: a federated round in plain TensorFlow, no TFF.

`PureTFFloor` runs, for each client of the cohort, the very client loop of the
TFF process (`perfed_tff.per_fedavg_client_work.build_client_update`, or for
FedAvg tau SGD steps at beta with `perfed_tff.model_oracles.sgd_steps`) on the
same `VariableModel`, at most `max_concurrent_computation_calls` clients at a
time (as the TFF worker is configured), then averages the client models
exactly like the process (uniform mean of the updates w - w_i, applied at
learning rate 1).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import tensorflow as tf

from perfed_tff import model_oracles
from perfed_tff import per_fedavg_client_work as client_work_lib
from perfed_tff import per_fedavg_step as step_lib


class PureTFFloor:
  """Per-FedAvg rounds in plain TensorFlow: the same client loop
  (`per_fedavg_client_work.build_client_update` on the oracle of the same
  VariableModel) and the same server average as `build_per_fedavg` with
  uniform weighting, with no TFF.

  A round is one `tf.function` call: the clients of the cohort are
  independent subgraphs (one model copy per cohort slot), at most
  `parallel_clients` of them running at a time (client i starts when client
  i - parallel_clients has finished), like TFF's worker with
  `max_concurrent_computation_calls`; `parallel_clients <= 0` lets all run
  at once. `variant=None` gives the FedAvg floor: tau plain SGD steps at beta
  per client (`model_oracles.sgd_steps`).
  """

  def __init__(self, model_fn, *, variant: Optional[step_lib.Variant],
               alpha: float, beta: float, delta: float, local_steps: int,
               clients_per_round: int, parallel_clients: int = 2):
    self.variant = variant
    self.clients_per_round = clients_per_round
    self.parallel_clients = (parallel_clients if parallel_clients > 0
                             else clients_per_round)
    self._models = [model_fn() for _ in range(clients_per_round)]
    self.client_updates = []
    for model in self._models:
      oracle = model_oracles.oracle_for(model)
      if variant is None:
        fn = _fedavg_client_update(oracle, beta=beta, local_steps=local_steps)
      else:
        fn = client_work_lib.build_client_update(
            oracle, variant=variant, alpha=alpha, beta=beta, delta=delta,
            local_steps=local_steps)
      self.client_updates.append(fn)
    self.weights = tuple(
        tf.identity(v) for v in self._models[0].trainable_variables)

    @tf.function
    def run_round(initial, datasets):
      finals, counts = [], []
      for i, (fn, ds) in enumerate(zip(self.client_updates, datasets)):
        start = initial
        if i >= self.parallel_clients:
          with tf.control_dependencies(
              tf.nest.flatten(finals[i - self.parallel_clients])):
            start = tuple(tf.identity(w) for w in initial)
        final, metrics = fn(start, ds)
        finals.append(tuple(final))
        counts.append(metrics['num_steps'])
      # Mirrors the process: update_i = w - w_i, zeroed with weight 0 when
      # non-finite or when the client made no step; uniform mean of the
      # updates; w <- w - 1.0 * mean.
      updates, weights = [], []
      for final, steps in zip(finals, counts):
        update = tuple(a - b for a, b in zip(initial, final))
        finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(u)) for u in update])
        ok = tf.logical_and(finite, steps > 0)
        update = tuple(tf.where(ok, u, tf.zeros_like(u)) for u in update)
        updates.append(update)
        weights.append(tf.where(ok, 1.0, 0.0))
      total = tf.add_n(weights)
      mean = tuple(
          tf.math.divide_no_nan(
              tf.add_n([w * u[i] for w, u in zip(weights, updates)]), total)
          for i in range(len(initial)))
      return tuple(a - m for a, m in zip(initial, mean))

    self._run_round = run_round

  def set_weights(self, trainable) -> None:
    self.weights = tuple(tf.convert_to_tensor(w) for w in trainable)

  def run_round(self, datasets: Sequence[tf.data.Dataset]) -> None:
    if len(datasets) != self.clients_per_round:
      raise ValueError(f'expected {self.clients_per_round} client datasets, '
                       f'got {len(datasets)}')
    new = self._run_round(self.weights, tuple(datasets))
    # Like the TFF process, a round hands the model back to Python.
    self.weights = tuple(tf.convert_to_tensor(w.numpy()) for w in new)

  def tracing_count(self) -> int:
    """Traces of the round function (1 after the first round if nothing
    retraces)."""
    return self._run_round.experimental_get_tracing_count()


def _fedavg_client_update(oracle, *, beta, local_steps):
  """FedAvg's client loop, tau SGD steps at beta, in the signature of
  `per_fedavg_client_work.build_client_update`'s function."""

  @tf.function(autograph=False)
  def client_update(initial_trainable, dataset):
    final, steps, _ = model_oracles.sgd_steps(
        oracle, initial_trainable, dataset, beta, local_steps)
    return final, collections.OrderedDict(num_steps=steps)

  return client_update
