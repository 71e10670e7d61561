"""Personalized evaluation of a run's global model on its populations.

'seen' = the training users' held-out test data, 'unseen' = users never
sampled for training (when the task has them); with the 'paper' protocol also
'seen_paper' / 'unseen_paper' (the step on test data, see
`perfed_tff.personalization_eval`). Each population is capped at
`config.eval_clients` clients by `sample_eval_clients`, a seeded choice that
is the same for every algorithm and every round of a run.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from perfed_tff import personalization_eval
from perfed_tff.data import task as task_lib
from perfed_tff.program import config as config_lib
from perfed_tff.program import metrics as metrics_lib


def sample_eval_clients(client_ids: Sequence[str], max_clients: int,
                        seed: int, population: str) -> list[str]:
  """All of `client_ids` (max_clients 0 or enough), else a sorted seeded
  choice of `max_clients` of them: a pure function of (ids, seed,
  population)."""
  ids = list(client_ids)
  if not max_clients or len(ids) <= max_clients:
    return ids
  rng = np.random.default_rng(task_lib.derive_seed(seed, 'eval', population))
  return sorted(rng.choice(ids, max_clients, replace=False).tolist())


def build_evaluate_fn(config: config_lib.TrainingConfig,
                      task: task_lib.FederatedTask
                      ) -> Callable[[Any], dict]:
  """`fn(model_weights) -> nested metrics {'seen': {'step_k': {...}}, ...}`:
  one personalized-evaluation computation (k steps at alpha on each client's
  train data for k in `config.eval_steps`, metrics on its test data)."""
  computation = personalization_eval.build_personalized_evaluation(
      task.model_fn, alpha=config.alpha,
      adaptation_steps=tuple(config.eval_steps),
      ignore_label=task.ignore_label)
  seen = sample_eval_clients(task.test.client_ids, config.eval_clients,
                             config.seed, 'seen')
  unseen = (None if task.unseen is None else sample_eval_clients(
      task.unseen[1].client_ids, config.eval_clients, config.seed, 'unseen'))

  def evaluate(model_weights) -> dict:
    results = personalization_eval.evaluate_task(
        computation, model_weights, task,
        adapt_batch_size=config.effective_adapt_batch_size, seed=config.seed,
        seen_client_ids=seen, unseen_client_ids=unseen,
        protocols=config.eval_protocols)
    return {population: r.summary() for population, r in results.items()}

  return evaluate


def summary_at(eval_row: dict) -> dict:
  """A flat eval CSV row -> {'seen': summary, 'unseen': summary}."""
  nested = metrics_lib.unflatten_metrics(
      {k: v for k, v in eval_row.items()
       if k not in ('round', metrics_lib.EVAL_TIME_KEY)})
  return {p: s for p, s in nested.items() if isinstance(s, dict)}
