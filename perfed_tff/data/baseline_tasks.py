"""TFF's baseline tasks (`tff.simulation.baselines.BaselineTask`) as
`FederatedTask`s.

A baseline task (e.g.
`tff.simulation.baselines.emnist.create_character_recognition_task` or
`tff.simulation.baselines.shakespeare.create_character_prediction_task`)
holds raw client data (`task.datasets.train_data`, `test_data`), two
preprocessing functions built from `tff.simulation.baselines.ClientSpec`s
(`train_preprocess_fn`, `eval_preprocess_fn`) and a `model_fn`. TFF's
functions do two different things to a client's dataset:

* **per example**: EMNIST's reshape of `pixels` [28, 28] to x [28, 28, 1]
  with y = `label` (`emnist_preprocessing`); Shakespeare's character-to-id
  mapping of a snippet (BOS/EOS, padding to a multiple of L + 1) and its cut
  into sequences x = c[:-1], y = c[1:] (`char_prediction_preprocessing`);
* **across examples**: the `ClientSpec`'s shuffle (`shuffle_buffer_size`),
  repetition (`num_epochs`), cut (`max_elements`) and batching
  (`batch_size`).

**The rule.** This library keeps the per-example part and does the
across-examples part itself: Per-FedAvg needs its own batches D, D', D'' per
local step (seeded shuffle, repeat, `batch_size`, `num_batches`:
`task.client_batches`), and the personalized evaluation needs a client's
unbatched examples to build its adaptation batches (`adapt_batch_size`) and
its test set. So a client's examples are the task's *eval* preprocessing
applied to each raw example on its own, batches undone
(`example_preprocess_fn`): whatever it does to one example (a reshape, a
tokenization, a cut into several sequences) is kept; shuffling a one-example
dataset does nothing and its batch holds that example, so neither the order
nor the contents depend on the shuffle. The train split gets the same
function: in TFF's tasks the train and eval preprocessing are the same
function of two `ClientSpec`s (`create_preprocess_fn(train_client_spec)`,
`create_preprocess_fn(eval_client_spec)`), so they differ only in the
across-examples part, which the library replaces (the `train_client_spec`
is not used; a test checks that both give the same examples for EMNIST and
Shakespeare). `num_epochs` > 1 in the *eval* spec would repeat every example:
keep TFF's default eval spec (one epoch, no shuffle) or any one-epoch spec.

`from_baseline_task` returns a `FederatedTask` (the splits so preprocessed,
the task's `model_fn` and the metrics of its model), usable everywhere a
registry task is:
`task.round_client_data`, `worker_datasets`, `population_eval`,
`training_loop.run_training(config, task=...)`. TFF's public API gives no
Keras model of a baseline task's `model_fn` (`from_keras_model` keeps it to
itself), so such a task has no `keras_model_fn` or `FunctionalModel`: it
trains and is evaluated as its `VariableModel`, and `perfed_tff.export`
needs the Keras model from the task's author. `client_data_splits` gives
only the two preprocessed splits (what `population_eval.evaluate_population`
uses when handed a `BaselineTask` or its `BaselineTaskDatasets`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union
import weakref

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.data import task as task_lib
from perfed_tff.data import unseen as unseen_lib

# `ignore_label` default: the token the model's own masked metrics leave out.
FROM_MODEL = 'from_model'
# Metrics TFF's `from_keras_model` adds itself (and `functional_model` too).
_ADDED_METRICS = ('loss', 'num_examples', 'num_batches')

BaselineLike = Union[tff.simulation.baselines.BaselineTask,
                     tff.simulation.baselines.BaselineTaskDatasets]


def is_baseline(value) -> bool:
  """Whether `value` is a `BaselineTask` or a `BaselineTaskDatasets`."""
  return isinstance(value, (tff.simulation.baselines.BaselineTask,
                            tff.simulation.baselines.BaselineTaskDatasets))


def _datasets(value) -> tff.simulation.baselines.BaselineTaskDatasets:
  if isinstance(value, tff.simulation.baselines.BaselineTask):
    return value.datasets
  if isinstance(value, tff.simulation.baselines.BaselineTaskDatasets):
    return value
  raise TypeError('`baseline_task` must be a tff.simulation.baselines.'
                  f'BaselineTask or BaselineTaskDatasets, got '
                  f'{type(value).__name__}.')


def example_preprocess_fn(
    preprocess_fn: Optional[Callable[[tf.data.Dataset], tf.data.Dataset]]
) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """The per-example part of a baseline task's `preprocess_fn` (module rule).

  Returns `fn(raw client dataset) -> dataset of examples`: `preprocess_fn`
  applied to every raw example as a one-example dataset, its batches
  unbatched, in the raw examples' order. `None` (a task without
  preprocessing) is the identity.
  """
  if preprocess_fn is None:
    return lambda dataset: dataset
  if not callable(preprocess_fn):
    raise TypeError('`preprocess_fn` must be None or a callable of a '
                    f'tf.data.Dataset, got {type(preprocess_fn).__name__}.')

  def examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.flat_map(
        lambda example: preprocess_fn(
            tf.data.Dataset.from_tensors(example)).unbatch())

  return examples


def _check_federated_test_data(datasets) -> None:
  if not isinstance(datasets.test_data, tff.simulation.datasets.ClientData):
    raise checks.ArgumentError(
        'baseline_task', 'must have federated test data (a ClientData) for '
        'the personalized evaluation, got a '
        f'{type(datasets.test_data).__name__}')


def _splits(datasets, *, seed: int = 0,
            num_unseen_users: Optional[int] = None,
            unseen_fraction: Optional[float] = None):
  """(train, test, unseen) of `datasets` under the module's rule."""
  _check_federated_test_data(datasets)
  return unseen_lib.populations(
      datasets.train_data, datasets.test_data,
      example_preprocess_fn(datasets.eval_preprocess_fn), seed=seed,
      num_unseen_users=num_unseen_users, unseen_fraction=unseen_fraction,
      dataset='baseline task', path='its train and test data')


_SPLITS = weakref.WeakKeyDictionary()


def client_data_splits(baseline_task: BaselineLike) -> tuple:
  """(train, test) `ClientData` of unbatched examples of a `BaselineTask`
  (or its `BaselineTaskDatasets`): every client in both raw splits, each
  dataset passed through `example_preprocess_fn(eval_preprocess_fn)`
  lazily. The same two objects for the same task (so
  `worker_datasets.client_examples` caches a client's examples across
  evaluations).

  Raises:
    checks.ArgumentError: the task's test data are centralized.
  """
  datasets = _datasets(baseline_task)
  splits = _SPLITS.get(datasets)
  if splits is None:
    train, test, _ = _splits(datasets)
    splits = _SPLITS[datasets] = (train, test)
  return splits


def _model_parts(model_fn):
  """(input_spec, keras_model_fn, loss_fn, metrics_fn, masked tokens) of
  `model_fn`'s model: its input spec; its metrics (without the loss and
  counters `tff.learning.models.from_keras_model` adds), rebuilt from their
  configs on each call, when the model lists them (`get_metrics()`); the
  labels its masked metrics leave out. The Keras model and loss are not
  available through TFF's public API: those two functions raise a one-line
  TypeError."""
  with tf.Graph().as_default():
    model = model_fn()
    input_spec = model.input_spec
    metrics = list(model.get_metrics()) if hasattr(model, 'get_metrics') else []
    configs = [(type(m), m.get_config()) for m in metrics
               if m.name not in _ADDED_METRICS]
  masked = set()
  for _, config in configs:
    masked.update(int(t) for t in config.get('masked_tokens') or ())

  def unavailable():
    raise TypeError(
        "a baseline task's Keras model is not available through TFF's "
        'public API: the task trains and is evaluated as its VariableModel '
        '(model_fn); export needs the Keras model from its author.')

  def metrics_fn() -> list:
    return [cls.from_config(dict(config)) for cls, config in configs]

  return input_spec, unavailable, unavailable, metrics_fn, masked


def _ignore_label(ignore_label, masked: set) -> Optional[int]:
  """`ignore_label` as given, or (FROM_MODEL) the model's one masked label."""
  if ignore_label != FROM_MODEL:
    return ignore_label
  if len(masked) > 1:
    raise checks.ArgumentError(
        'ignore_label', f'must be given: the model masks several labels '
        f'({sorted(masked)}) and the evaluation leaves out one')
  return next(iter(masked)) if masked else None


def from_baseline_task(baseline_task: tff.simulation.baselines.BaselineTask,
                       *, name: str = 'baseline_task', seed: int = 0,
                       num_unseen_users: Optional[int] = None,
                       unseen_fraction: Optional[float] = None,
                       ignore_label: Union[int, None, str] = FROM_MODEL,
                       shuffle_buffer: int = 1000
                       ) -> task_lib.FederatedTask:
  """A TFF `BaselineTask` as a `FederatedTask` (the module's rule).

  Args:
    baseline_task: a `tff.simulation.baselines.BaselineTask` whose test data
      are federated (`ClientData`; the personalized evaluation is per client).
    name: the task's name.
    seed: seeds the choice of unseen clients.
    num_unseen_users / unseen_fraction: clients held out of training (the
      unseen population; at most one of them).
    ignore_label: the label value accuracy leaves out; default: the one
      token the model's masked metrics leave out (TFF's Shakespeare task:
      the pad id 0), else None.
    shuffle_buffer: the shuffle buffer of the library's batch streams.

  Returns:
    A `FederatedTask` over the clients in both raw splits: `train`/`test`
    hold each client's examples after the task's per-example preprocessing,
    `model_fn` is the task's, `element_spec` its model's `input_spec`.

  Raises:
    TypeError: `baseline_task` is not a BaselineTask.
    checks.ArgumentError: centralized test data, bad options, or a model that
      masks several labels without `ignore_label`.
  """
  if not isinstance(baseline_task, tff.simulation.baselines.BaselineTask):
    raise TypeError('`baseline_task` must be a tff.simulation.baselines.'
                    f'BaselineTask, got {type(baseline_task).__name__}.')
  _check_federated_test_data(baseline_task.datasets)
  unseen_lib.check_unseen_options(num_unseen_users, unseen_fraction)
  shuffle_buffer = checks.integer('shuffle_buffer', shuffle_buffer, 1)
  seed = checks.integer('seed', seed, 0)
  if ignore_label is not None and ignore_label != FROM_MODEL:
    ignore_label = checks.integer('ignore_label', ignore_label, 0)
  element_spec, keras_model_fn, loss_fn, metrics_fn, masked = _model_parts(
      baseline_task.model_fn)
  ignore_label = _ignore_label(ignore_label, masked)
  if num_unseen_users is None and unseen_fraction is None:
    (train, test), unseen = client_data_splits(baseline_task), None
  else:
    train, test, unseen = _splits(
        baseline_task.datasets, seed=seed, num_unseen_users=num_unseen_users,
        unseen_fraction=unseen_fraction)
  return task_lib.FederatedTask(
      name=name, train=train, test=test, unseen=unseen,
      model_fn=baseline_task.model_fn, keras_model_fn=keras_model_fn,
      loss_fn=loss_fn, element_spec=element_spec,
      shuffle_buffer=shuffle_buffer, ignore_label=ignore_label,
      metrics_fn=metrics_fn)
