"""Divergence detection (`perfed_tff/program/divergence.py`): unusable
updates, an exploding loss, a non-finite loss."""

import numpy as np
import pytest

from experiments import cli
from perfed_tff.program import divergence


def _check(**kw):
  return divergence.DivergenceCheck(
      'run', clients_per_round=3, hyperparameters={'beta': 5.0, 'alpha': 0.1},
      **kw)


def _round(loss, non_finite=0, examples=30):
  return {'client_work': {'train': {
      'loss': np.float32(loss), 'num_non_finite_updates': np.int64(non_finite),
      'num_clients_without_step': np.int64(0),
      'num_examples': np.int64(examples)}}}


def test_every_update_non_finite_three_rounds_in_a_row_stops():
  check = _check()
  check.check(_round(2.0), 1)
  void = _round(0.0, non_finite=3, examples=0)
  check.check(void, 2)
  assert np.isnan(void['client_work']['train']['loss'])  # Not TFF's 0.0.
  check.check(_round(1.5), 3)  # A good round resets the count.
  check.check(_round(0.0, non_finite=3, examples=0), 4)
  check.check(_round(0.0, non_finite=2, examples=0), 5)
  with pytest.raises(divergence.DivergenceError,
                     match=r'no client update was usable .* in rounds 4-6; '
                     r'.* Likely too large: `beta`=5 or `alpha`=0.1') as e:
    check.check(_round(0.0, non_finite=3, examples=0), 6)
  assert e.value.round_num == 6
  # The binaries name the parameters as their flags.
  assert 'Likely too large: --beta=5 or --alpha=0.1' in cli.as_flags(
      str(e.value))


def test_exploding_loss_stops():
  check = _check()
  check.check(_round(2.3), 1)
  check.check(_round(50.0), 2)
  with pytest.raises(divergence.DivergenceError,
                     match=r'loss exploded to 2500 at round 3 \(first round: '
                     r'2.3'):
    check.check(_round(2500.0), 3)
  resumed = _check(reference_loss=2.3)
  with pytest.raises(divergence.DivergenceError):
    resumed.check(_round(1e5), 7)


def test_non_finite_loss_stops_but_is_no_divergence():
  check = _check()
  check.check(_round(2.0), 1)
  with pytest.raises(divergence.NonFiniteLossError,
                     match='global training loss is nan at round 2') as e:
    check.check(_round(float('nan')), 2)
  assert not isinstance(e.value, divergence.DivergenceError)
