"""Decides, from one round's training metrics, whether a run has diverged.

TFF's `training_program_logic` asks `should_discard_round(train_result)`
after each round; here `DivergenceCheck.check(metrics, round_num)` is asked
the same way by the training loop, right after the round's `next` and before
its metrics are released or its state checkpointed. It stops the run with

* `DivergenceError` after `max_void_rounds` void rounds in a row (no client
  update was used: every one non-finite, or no client took a step; TFF then
  reports loss 0.0, which is recorded as nan instead), or on a training loss
  `explosion_factor` times its first-round value (or above `loss_limit`);
* `NonFiniteLossError` on a NaN or infinite global training loss (that
  round's metrics are still released: the row says what happened).

Messages name the run's parameters (`beta`, `alpha`) in backticks, as the
library's argument errors do; the binaries turn them into flags.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, MutableMapping, Optional

TRAIN_LOSS = 'client_work/train/loss'
PERSONALIZED_LOSS = 'client_work/train/personalized_loss'
NUM_NON_FINITE = 'client_work/train/num_non_finite_updates'
NUM_WITHOUT_STEP = 'client_work/train/num_clients_without_step'
NUM_EXAMPLES = 'client_work/train/num_examples'
UPDATE_NON_FINITE = 'finalizer/update_non_finite'

MAX_VOID_ROUNDS = 3
EXPLOSION_FACTOR = 1e3
# Every dataset here trains a cross-entropy loss (log(num_classes) <= 5 for
# an untrained model): above this, logits differ by thousands; the step size
# blew the weights up already within the first round.
LOSS_LIMIT = 1e4


class NonFiniteLossError(RuntimeError):
  """The global training loss became NaN or infinite. `round_num`: the
  round; its metrics were released before the run stopped."""

  def __init__(self, message: str, round_num: Optional[int] = None):
    super().__init__(message)
    self.round_num = round_num


class DivergenceError(NonFiniteLossError):
  """Training diverged: no usable client update for several rounds in a row,
  or an exploding loss. The round's metrics were not released."""


def _lookup(metrics: Mapping, key: str):
  node = metrics
  for part in key.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def _assign(metrics: MutableMapping, key: str, value) -> None:
  *parents, leaf = key.split('/')
  node = metrics
  for part in parents:
    node = node[part]
  node[leaf] = value


def _number(value):
  return None if value is None else float(value)


class DivergenceCheck:
  """The divergence rules of one run (see the module docstring).

  Args:
    label: the run's name in messages.
    clients_per_round: clients of a round (a round whose every client was
      rejected or took no step is void); None: only an aggregate update
      flagged non-finite or no examples at all makes a round void.
    max_void_rounds: void rounds in a row that stop the run.
    reference_loss: the first round's loss (on resume); else the first
      checked one.
    explosion_factor: a loss above this times max(reference loss, 1) stops
      the run.
    loss_limit: a loss above this stops the run (None: no limit).
    hyperparameters: {parameter: value} named, in order, as likely too large
      when the run diverges.
    last_good_checkpoint: fn() -> path of the last checkpoint, or None.
  """

  def __init__(self, label: str, *,
               clients_per_round: Optional[int] = None,
               max_void_rounds: int = MAX_VOID_ROUNDS,
               reference_loss: Optional[float] = None,
               explosion_factor: float = EXPLOSION_FACTOR,
               loss_limit: Optional[float] = LOSS_LIMIT,
               hyperparameters: Optional[Mapping[str, float]] = None,
               last_good_checkpoint: Callable[[], Optional[str]] = (
                   lambda: None)):
    self._label = label
    self._clients_per_round = clients_per_round
    self._max_void_rounds = max_void_rounds
    self._void_rounds = []
    self._reference_loss = (None if reference_loss is None
                            or not math.isfinite(reference_loss)
                            else float(reference_loss))
    self._explosion_factor = explosion_factor
    self._loss_limit = loss_limit
    self._hyperparameters = dict(hyperparameters or {'beta': None,
                                                     'alpha': None})
    self._last_good_checkpoint = last_good_checkpoint

  def _void(self, metrics: Mapping) -> bool:
    """No client update was used this round (TFF then reports loss 0.0)."""
    if _lookup(metrics, UPDATE_NON_FINITE):
      return True
    examples = _lookup(metrics, NUM_EXAMPLES)
    if examples is not None and examples == 0:
      return True
    non_finite = _lookup(metrics, NUM_NON_FINITE)
    without_step = _lookup(metrics, NUM_WITHOUT_STEP)
    rejected = (non_finite or 0) + (without_step or 0)
    return bool(self._clients_per_round and
                (non_finite is not None or without_step is not None) and
                rejected >= self._clients_per_round)

  def _suspects(self) -> str:
    return ' or '.join(f'`{k}`' + ('' if v is None else f'={v:g}')
                       for k, v in self._hyperparameters.items())

  def _where(self) -> str:
    path = self._last_good_checkpoint()
    return (f'the last good checkpoint is {path}' if path
            else 'no checkpoint was saved')

  def check(self, metrics: MutableMapping, round_num: int) -> None:
    """Checks round `round_num`'s training metrics (nested, as the process
    returns them); a void round's losses are set to nan in `metrics`.

    Raises:
      DivergenceError: see the class.
      NonFiniteLossError: a non-finite global training loss.
    """
    if self._void(metrics):
      self._void_rounds.append(round_num)
      for key in (TRAIN_LOSS, PERSONALIZED_LOSS):
        if _lookup(metrics, key) is not None:
          _assign(metrics, key, float('nan'))  # Not TFF's 0.0 of no clients.
      if len(self._void_rounds) >= self._max_void_rounds:
        raise DivergenceError(
            f'{self._label}: no client update was usable (all non-finite, or '
            f'no client took a step) in rounds {self._void_rounds[0]}-'
            f'{round_num}; stopping ({self._where()}). Likely too large: '
            f'{self._suspects()}.', round_num)
      return
    self._void_rounds = []
    loss = _number(_lookup(metrics, TRAIN_LOSS))
    if loss is None:
      return
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'{self._label}: the global training loss is {loss} at round '
          f'{round_num}; stopping ({self._where()}). Try a smaller '
          f'{self._suspects()}.', round_num)
    if self._reference_loss is None:
      self._reference_loss = loss
    limit = self._explosion_factor * max(self._reference_loss, 1.0)
    if self._loss_limit is not None:
      limit = min(limit, self._loss_limit)
    if loss > limit:
      raise DivergenceError(
          f'{self._label}: the training loss exploded to {loss:.4g} at round '
          f'{round_num} (first round: {self._reference_loss:.4g}); stopping '
          f'({self._where()}). Likely too large: {self._suspects()}.',
          round_num)
