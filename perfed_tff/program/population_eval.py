"""Personalized evaluation of a model on populations of clients (the
Python driver of `perfed_tff.personalization_eval`'s TFF computation).

A *population* is a set of clients of a task: 'seen' (the training users'
held-out test data) and 'unseen' (users never sampled for training, when the
task has them). Under the evaluation protocol 'paper' (the paper's own
evaluation as it is quoted: the test-time step on a batch of the user's
*test* data, then the test data) the same populations are named
`population_name('seen', 'paper')` = 'seen_paper' and 'unseen_paper'; the
default protocol 'heldout' adapts on the user's train data only
(`perfed_tff.personalization_data`).

* `evaluate_population` prepares each client's input from `ClientData`
  (seeded adaptation batches, the full test set, built on the TFF worker),
  runs the evaluation at a step size alpha and returns per-client results;
  `summarize` gives the client mean (each client once), the example-weighted
  mean and percentiles. It also takes a TFF baseline task
  (`tff.simulation.baselines.BaselineTask` or its `BaselineTaskDatasets`) in
  place of the two splits: its clients' examples after the task's
  per-example preprocessing (`perfed_tff.data.baseline_tasks`), batched
  here. Data whose examples do not match the evaluation's model (e.g. a
  baseline task's raw `ClientData`) are refused up front with a one-line
  error.
* `evaluate_task` does that for every population and protocol of a task
  (a `FederatedTask`, or a `BaselineTask`: its one population, 'seen').
* `build_evaluate_fn` is the training program's evaluation:
  `fn(model_weights, alpha)`, populations capped at a number of clients by
  `sample_eval_clients` (a seeded choice, the same for every algorithm and
  round of a run).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff import personalization_data
from perfed_tff import personalization_eval
from perfed_tff.data import baseline_tasks
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets
from perfed_tff.models import specs
from perfed_tff.program import metrics as metrics_lib

PERCENTILES = (10, 50, 90)
POPULATIONS = ('seen', 'unseen')
step_key = personalization_eval.step_key
Evaluation = personalization_eval.PersonalizedEvaluation


def population_name(population: str, protocol: str) -> str:
  """'seen', 'heldout' -> 'seen'; 'seen', 'paper' -> 'seen_paper'."""
  return population if protocol == 'heldout' else f'{population}_{protocol}'


@dataclasses.dataclass
class PopulationResult:
  """Per-client results of one population and their summary."""
  client_ids: list
  num_test_examples: np.ndarray            # [clients]
  accuracy: dict                           # step k -> [clients]
  loss: dict                               # step k -> [clients]
  num_adaptation_steps: np.ndarray         # [clients]

  @property
  def steps(self) -> tuple[int, ...]:
    return tuple(sorted(self.accuracy))

  def summary(self) -> collections.OrderedDict:
    return summarize(self)


def _to_population(client_ids, outputs, steps) -> PopulationResult:
  if isinstance(outputs, Mapping):  # A single client comes back unwrapped.
    outputs = [outputs]
  n_test = np.array([int(o['num_test_examples']) for o in outputs])
  acc = {k: np.array([float(o['metrics'][step_key(k)]['accuracy'])
                      for o in outputs]) for k in steps}
  loss = {k: np.array([float(o['metrics'][step_key(k)]['loss'])
                       for o in outputs]) for k in steps}
  taken = np.array([int(o['num_adaptation_steps']) for o in outputs])
  return PopulationResult(list(client_ids), n_test, acc, loss, taken)


def summarize(result: PopulationResult) -> collections.OrderedDict:
  """Per step k: client-mean accuracy and loss (each client once), the
  example-weighted mean accuracy and loss, percentiles of per-client accuracy.

  `num_clients`: the clients measured. `num_clients_empty`: clients without
  test examples, left out of every metric (nothing to measure them on).
  `num_clients_without_step`: measured clients whose adaptation took no step
  (no adaptation example: an empty train split; under protocol 'paper',
  which adapts on the test split, none); they stay in every step's metrics
  with the global model's numbers (with no data to adapt on, their
  personalized model is the global one), so step 0 and step k average over
  the same clients.
  """
  keep = result.num_test_examples > 0
  weights = result.num_test_examples[keep].astype(np.float64)
  out = collections.OrderedDict(
      num_clients=int(keep.sum()),
      num_clients_empty=int((~keep).sum()),
      num_clients_without_step=int(
          (keep & (result.num_adaptation_steps == 0)).sum()),
      num_test_examples=int(weights.sum()))
  for k in result.steps:
    acc = result.accuracy[k][keep]
    loss = result.loss[k][keep]
    s = collections.OrderedDict()
    if acc.size:
      s['accuracy_mean'] = float(np.mean(acc))
      s['accuracy_weighted'] = float(np.average(acc, weights=weights))
      for p in PERCENTILES:
        s[f'accuracy_p{p}'] = float(np.percentile(acc, p))
      s['loss_mean'] = float(np.mean(loss))
      s['loss_weighted'] = float(np.average(loss, weights=weights))
    else:
      for name in (['accuracy_mean', 'accuracy_weighted']
                   + [f'accuracy_p{p}' for p in PERCENTILES]
                   + ['loss_mean', 'loss_weighted']):
        s[name] = float('nan')
    out[step_key(k)] = s
  return out


def _expected_example_type(evaluation: Evaluation) -> Optional[tff.Type]:
  """The TFF type of one example `evaluation`'s clients hold."""
  try:
    element = evaluation.type_signature.parameter[2].member[0].element
  except (AttributeError, IndexError, TypeError):
    return None
  if evaluation.input_format == 'unbatched':
    return element
  return tff.types.tensorflow_to_type(specs.unbatched_spec(
      tff.types.type_to_tf_tensor_specs(element)))


def check_examples(evaluation, name: str, client_data) -> None:
  """`client_data`'s examples are what `evaluation`'s model takes.

  Raises:
    checks.ArgumentError: they are not (e.g. a baseline task's raw
      `ClientData`, which needs the task's preprocessing: pass the task).
  """
  expected = _expected_example_type(evaluation)
  structure = getattr(client_data, 'element_type_structure', None)
  if expected is None or structure is None:
    return
  actual = tff.types.tensorflow_to_type(structure)
  if not expected.is_assignable_from(actual):
    raise checks.ArgumentError(
        name, f"holds examples {actual}, not the evaluation model's "
        f'{expected}; a tff.simulation.baselines task\'s raw ClientData needs '
        'its preprocessing: pass the BaselineTask itself')


def _baseline_splits(train_data, test_data) -> tuple:
  """(train, test) ClientData of `evaluate_population`'s data arguments."""
  if baseline_tasks.is_baseline(train_data):
    if test_data is not None:
      raise checks.ArgumentError(
          'test_data', 'must be omitted with a baseline task (its own test '
          'data are used)')
    return baseline_tasks.client_data_splits(train_data)
  if test_data is None:
    raise checks.ArgumentError(
        'test_data', 'is required with train_data a ClientData')
  return train_data, test_data


def evaluate_population(evaluation: Evaluation, model_weights,
                        train_data,
                        test_data: Optional[
                            tff.simulation.datasets.ClientData] = None,
                        client_ids: Optional[Sequence[str]] = None, *,
                        alpha: float,
                        adapt_batch_size: Optional[int] = 32, seed: int = 0,
                        eval_batch_size: int = (
                            personalization_data.EVAL_BATCH_SIZE),
                        protocol: str = 'heldout') -> PopulationResult:
  """Runs `evaluation` (from `build_personalized_evaluation`) on clients,
  its adaptation steps at `alpha`.

  Adaptation batches come from `train_data` (protocol 'heldout') or from
  `test_data` (protocol 'paper'), seeded by
  `personalization_data.adaptation_seed(seed, client_id)` (the same for
  every algorithm); metrics from `test_data`. Returns per-client results.

  `train_data` is a `ClientData` of unbatched examples (with `test_data`),
  or a `tff.simulation.baselines.BaselineTask` / `BaselineTaskDatasets`
  (without `test_data`): then both splits are the task's, each client's
  examples after the task's per-example preprocessing, the task's batching,
  shuffling and epochs replaced by the adaptation batches here
  (`perfed_tff.data.baseline_tasks.client_data_splits`).

  Raises:
    checks.ArgumentError: a bad protocol or alpha, `test_data` missing (or
      given with a baseline task), or examples that the evaluation's model
      does not take (e.g. a baseline task's raw `ClientData`).
  """
  personalization_data.check_protocol(protocol, 'protocol')
  alpha = checks.step_size('alpha', alpha)
  train_data, test_data = _baseline_splits(train_data, test_data)
  check_examples(evaluation, 'test_data', test_data)
  if protocol != 'paper':
    check_examples(evaluation, 'train_data', train_data)
  steps = evaluation.adaptation_steps
  if client_ids is None:
    client_ids = list(test_data.client_ids)
  client_ids = list(client_ids)
  adapt_data = test_data if protocol == 'paper' else train_data
  seeds = [personalization_data.adaptation_seed(seed, cid)
           for cid in client_ids]
  if evaluation.input_format == 'batched':
    # Batches built on the worker from the clients' examples.
    worker_side = personalization_data.worker_side_evaluation(
        evaluation, test_data.element_type_structure,
        adapt_batch_size=adapt_batch_size, eval_batch_size=eval_batch_size)
    adapt_examples = worker_datasets.client_examples(adapt_data)
    test_examples = worker_datasets.client_examples(test_data)
    outputs = worker_side(model_weights, np.float32(alpha), [
        collections.OrderedDict(adapt=adapt_examples(cid),
                                test=test_examples(cid), seed=np.int64(s))
        for cid, s in zip(client_ids, seeds)])
    return _to_population(client_ids, outputs, (0,) + tuple(steps))
  # The computation batches by its own batch_size: the same batches.
  adapt_batch_size = evaluation.batch_size
  inputs = [
      personalization_data.client_input(
          adapt_data.create_tf_dataset_for_client(cid),
          test_data.create_tf_dataset_for_client(cid),
          num_steps=max(steps), adapt_batch_size=adapt_batch_size,
          seed=s, eval_batch_size=eval_batch_size)
      for cid, s in zip(client_ids, seeds)]
  inputs = [collections.OrderedDict(
      train_data=(x['train_data'].take(1).unbatch()
                  if adapt_batch_size is None
                  else x['train_data'].unbatch()),
      test_data=x['test_data'].unbatch()) for x in inputs]
  outputs = evaluation(model_weights, alpha, inputs)
  return _to_population(client_ids, outputs, (0,) + tuple(steps))


def evaluate_task(evaluation: Evaluation, model_weights,
                  task: task_lib.FederatedTask | baseline_tasks.BaselineLike,
                  *, alpha: float,
                  adapt_batch_size: Optional[int] = 32, seed: int = 0,
                  seen_client_ids: Optional[Sequence[str]] = None,
                  unseen_client_ids: Optional[Sequence[str]] = None,
                  eval_batch_size: int = (
                      personalization_data.EVAL_BATCH_SIZE),
                  protocols: Sequence[str] = ('heldout',)
                  ) -> collections.OrderedDict:
  """Both populations under each protocol: 'seen' (training clients'
  held-out test data) and 'unseen' (never-trained clients, when the task has
  them); under protocol 'paper' they are named 'seen_paper' and
  'unseen_paper'. A `tff.simulation.baselines.BaselineTask` has one
  population, 'seen': its clients (`evaluate_population`'s baseline splits).
  """
  if baseline_tasks.is_baseline(task):
    (train, test), unseen = baseline_tasks.client_data_splits(task), None
  else:
    train, test, unseen = task.train, task.test, task.unseen
  out = collections.OrderedDict()
  for protocol in protocols:
    populations = [('seen', train, test, seen_client_ids)]
    if unseen is not None:
      populations.append(('unseen', *unseen, unseen_client_ids))
    for name, train_data, test_data, ids in populations:
      out[population_name(name, protocol)] = evaluate_population(
          evaluation, model_weights, train_data, test_data, ids, alpha=alpha,
          adapt_batch_size=adapt_batch_size, seed=seed,
          eval_batch_size=eval_batch_size, protocol=protocol)
  return out


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


def build_evaluate_fn(evaluation: Evaluation, task: task_lib.FederatedTask,
                      *, eval_clients: int, seed: int,
                      adapt_batch_size: Optional[int],
                      protocols: Sequence[str] = ('heldout',)
                      ) -> Callable[[Any, float], dict]:
  """`fn(model_weights, alpha) -> nested metrics {'seen': {'step_k': {...}},
  ...}`: `evaluation` (k steps at alpha on each client's train data, metrics
  on its test data) on the task's populations, each capped at
  `eval_clients` clients (0: all) by `sample_eval_clients`."""
  seen = sample_eval_clients(task.test.client_ids, eval_clients, seed, 'seen')
  unseen = (None if task.unseen is None else sample_eval_clients(
      task.unseen[1].client_ids, eval_clients, seed, 'unseen'))

  def evaluate(model_weights, alpha: float) -> dict:
    results = evaluate_task(
        evaluation, model_weights, task, alpha=alpha,
        adapt_batch_size=adapt_batch_size, seed=seed,
        seen_client_ids=seen, unseen_client_ids=unseen, protocols=protocols)
    return {population: r.summary() for population, r in results.items()}

  return evaluate


def summary_at(eval_row: dict) -> dict:
  """A flat eval CSV row -> {'seen': summary, 'unseen': summary}."""
  nested = metrics_lib.unflatten_metrics(
      {k: v for k, v in eval_row.items()
       if k not in ('round', metrics_lib.EVAL_TIME_KEY)})
  return {p: s for p, s in nested.items() if isinstance(s, dict)}
