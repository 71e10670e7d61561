"""Rounds in blocks (`perfed_tff/program/round_blocks.py`): where a block
ends, and training runs whose blocks give the very weights, metric rows and
checkpoints of one round per invocation, in process."""

import csv
import functools

import numpy as np
import pytest

from perfed_tff.accelerator import fused_round
from perfed_tff.accelerator import multi_round
from perfed_tff.accelerator import round_blocks
from perfed_tff.program import checkpointing
from perfed_tff.program import event_loop
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import training_loop as tp
from tests import tff_helpers as h


def test_a_block_ends_at_checkpoints_evaluations_and_the_last_round():
  end = functools.partial(round_blocks.last_round_of_block, total_rounds=20,
                          checkpoint_every=10, eval_every=10, max_rounds=10)
  assert [end(r) for r in (1, 4, 10, 11, 20)] == [10, 10, 10, 20, 20]
  end = functools.partial(round_blocks.last_round_of_block, total_rounds=13,
                          checkpoint_every=6, eval_every=4, max_rounds=10)
  assert [end(r) for r in (1, 5, 7, 9, 13)] == [4, 6, 8, 12, 13]
  # No evaluation: the checkpoint and max_rounds bound it.
  assert round_blocks.last_round_of_block(
      1, total_rounds=100, checkpoint_every=50, eval_every=0,
      max_rounds=10) == 10
  assert round_blocks.last_round_of_block(
      7, total_rounds=100, checkpoint_every=50, eval_every=0,
      max_rounds=1) == 7


def _train_rows(path):
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  return [{k: v for k, v in r.items() if k != metrics_lib.ROUND_SECONDS}
          for r in rows], [float(r[metrics_lib.ROUND_SECONDS]) for r in rows]


def _eval_rows(path):
  """The evaluation rows without their timing."""
  with open(path, newline='') as f:
    return [{k: v for k, v in r.items() if 'time' not in k}
            for r in csv.DictReader(f)]


@pytest.fixture
def block_sizes(monkeypatch):
  """The K of every multi-round computation built."""
  sizes = []
  build = multi_round.build_multi_round_next

  def spy(context, next_fn, rounds):
    sizes.append(rounds)
    return build(context, next_fn, rounds)

  monkeypatch.setattr(multi_round, 'build_multi_round_next', spy)
  return sizes


def test_blocks_give_the_weights_and_metrics_of_single_rounds(
    tmp_path, small_task, block_sizes):
  kw = dict(rounds=7, eval_every=3, checkpoint_every=5, eval_clients=3)
  runs = {}
  for k in (1, 0, 2):
    runs[k] = tp.run_training(
        h.training_config(tmp_path / f'k{k}', rounds_per_invocation=k, **kw),
        task=small_task)
    runs[k].blocks = list(block_sizes)
    block_sizes.clear()
  # One round per invocation builds no block; auto runs rounds 1-3, 4-5, 6
  # and 7 (evaluations at 3 and 6, a checkpoint at 5); K=2: 1-2, 3, 4-5, 6, 7.
  assert runs[1].blocks == [] and runs[0].blocks == [3, 2]
  assert runs[2].blocks == [2]
  single = runs[1]
  w1 = metrics_lib.load_model_weights(single.paths['final_model'])
  for k in (0, 2):
    wk = metrics_lib.load_model_weights(runs[k].paths['final_model'])
    assert sorted(wk) == sorted(w1)
    for name in w1:
      np.testing.assert_array_equal(wk[name], w1[name])
    rows, seconds = _train_rows(runs[k].paths['train_csv'])
    assert rows == _train_rows(single.paths['train_csv'])[0]
    assert all(s > 0 for s in seconds)
    assert _eval_rows(runs[k].paths['eval_csv']) == _eval_rows(
        single.paths['eval_csv'])
    assert event_loop.run_sync(checkpointing.CheckpointManager(
        runs[k].paths['checkpoints'], metadata={}).get_versions()) == [0, 5, 7]
  # A block's rounds share its time: rounds 1-3 of the auto run.
  _, seconds = _train_rows(runs[0].paths['train_csv'])
  assert seconds[0] == seconds[1] == seconds[2]


def test_resume_inside_a_block_plan_is_exact(tmp_path, small_task):
  """4 rounds, then resume to 9 (blocks 5, 6-8, 9 after the checkpoint at
  4) == 9 rounds at once with blocks (1-3, 4, ...)."""
  kw = dict(rounds=9, checkpoint_every=4, eval_every=3, eval_clients=3)
  full = tp.run_training(h.training_config(tmp_path / 'full', **kw),
                         task=small_task)
  tp.run_training(h.training_config(tmp_path / 'split', **dict(kw, rounds=4)),
                  task=small_task)
  split = tp.run_training(h.training_config(tmp_path / 'split', **kw),
                          task=small_task)
  assert split.resumed_from == 4
  a = metrics_lib.load_model_weights(full.paths['final_model'])
  b = metrics_lib.load_model_weights(split.paths['final_model'])
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert _train_rows(full.paths['train_csv'])[0] == _train_rows(
      split.paths['train_csv'])[0]


def test_fused_blocks_give_the_weights_and_metrics_of_single_rounds(
    tmp_path, small_task, monkeypatch):
  """With every round one TensorFlow computation (`fused_round`, forced on
  with the computation cache off): the weights, metric rows and evaluations
  of one federated round per invocation."""
  fused = []
  build = fused_round.build_fused_next

  def spy(*args, **kwargs):
    comp = build(*args, **kwargs)
    fused.append(comp is not None)
    return comp

  monkeypatch.setattr(fused_round, 'build_fused_next', spy)
  monkeypatch.setattr(round_blocks, 'FUSE_MIN_ROUNDS', 1)
  kw = dict(rounds=6, eval_every=3, checkpoint_every=5, eval_clients=3,
            algorithm='per_fedavg_hf')
  single = tp.run_training(
      h.training_config(tmp_path / 'k1', rounds_per_invocation=1, **kw),
      task=small_task)
  assert fused == []
  blocks = tp.run_training(h.training_config(tmp_path / 'k0', **kw),
                           task=small_task)
  assert fused == [True]
  a = metrics_lib.load_model_weights(single.paths['final_model'])
  b = metrics_lib.load_model_weights(blocks.paths['final_model'])
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert _train_rows(blocks.paths['train_csv'])[0] == _train_rows(
      single.paths['train_csv'])[0]
  assert _eval_rows(blocks.paths['eval_csv']) == _eval_rows(
      single.paths['eval_csv'])
