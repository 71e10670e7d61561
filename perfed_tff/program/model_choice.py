"""The model a training run trains FedAvg on: the task's `FunctionalModel`
where that is TFF's FedAvg bit for bit and faster, else its `model_fn`
(Per-FedAvg always trains the FunctionalModel,
`training_loop.build_process`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from absl import logging

from perfed_tff.data import task as task_lib
from perfed_tff.runtime import compilation


def fed_avg_model(functional_model_fn: Callable[..., Any], model_fn,
                  keras_model_fn: Optional[Callable[[], Any]] = None):
  """FedAvg's model in the training program: `functional_model_fn(
  loss_metric=True)` (`perfed_tff.fed_avg`: TFF's FedAvg, bit for bit, in
  0.91-0.96x the time on the digits MLP, 0.96x on the char LSTM), or
  `model_fn` (TFF's `build_weighted_fed_avg`, through
  `perfed_tff.fed_avg.build_variable_model_fed_avg`; the same state type):
  * for a convolutional model (`compilation.model_has_convolutions`: 1.08x
    on the EMNIST CNN with oneDNN's kernels);
  * for a Keras model (`keras_model_fn`, when given) that TFF's
    `functional_model_from_keras` does not carry whole: regularization
    losses or BatchNormalization (`task_lib.functional_model_carries`);
  * where the FunctionalModel cannot be made (TypeError: a task with no
    Keras model, `perfed_tff.data.baseline_tasks`; TFF's
    `KerasFunctionalModelError`).
  docs/performance.md, section 7."""
  try:
    if (keras_model_fn is not None
        and not task_lib.functional_model_carries(keras_model_fn)):
      return model_fn
    model = functional_model_fn(loss_metric=True)
  except (TypeError, task_lib.KerasFunctionalModelError) as e:
    logging.info('FedAvg on the VariableModel: %s', e)
    return model_fn
  return model_fn if compilation.model_has_convolutions(model) else model
