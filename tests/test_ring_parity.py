"""Results do not depend on the outer ring: three rounds of every algorithm
of the training program, with its evaluation, under TFF's own stock context
(runtime 'tff'), under the owned runtime ('owned') and with the accelerator
('accelerated': rounds in blocks, fused, computations kept) give the same
state (every leaf of the checkpoint), weights and metric files, bit for
bit, on the paper's MLP."""

import csv

import numpy as np
import pytest
import tree

from perfed_tff import algorithms
from perfed_tff.accelerator import round_blocks
from perfed_tff.program import checkpointing
from perfed_tff.program import event_loop
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import outputs
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.program import training_loop
from tests import contexts
from tests import tff_helpers as h

RUNTIMES = {'tff': contexts.tff_stock_context,
            'owned': contexts.owned_context,
            'accelerated': contexts.accelerated_context}
MLP = dict(dataset='digits',
           dataset_options='num_users=12,classes_per_user=2,num_unseen_users=3',
           rounds=3, clients_per_round=4, local_steps=2, batch_size=5,
           alpha=0.05, beta=0.1, eval_every=3, eval_clients=4,
           checkpoint_every=3, eval_steps=(1, 2))


def _rows(path):
  with open(path, newline='') as f:
    return [{k: v for k, v in row.items() if 'time' not in k
             and 'seconds' not in k} for row in csv.DictReader(f)]


def _run(tmp_path, runtime, algorithm, monkeypatch):
  """(final state leaves, weights, train rows, eval rows) of one run."""
  config = h.training_config(tmp_path / runtime / algorithm,
                             algorithm=algorithm, runtime=runtime, **MLP)
  if runtime == 'accelerated':  # Fused rounds even in a 3-round run.
    monkeypatch.setattr(round_blocks, 'FUSE_MIN_ROUNDS', 1)
  with RUNTIMES[runtime]():
    task = round_data.load_task(config)
    result = training_loop.run_training(config, task=task)
    structure = processes.build_process(config, task).initialize()
    state = event_loop.run_sync(checkpointing.CheckpointManager(
        outputs.output_paths(config)['checkpoints'],
        metadata=config.resume_metadata()).load(3, structure))
  monkeypatch.undo()
  leaves = [np.asarray(x) for x in tree.flatten(state)]
  weights = metrics_lib.load_model_weights(result.paths['final_model'])
  return (leaves, weights, _rows(result.paths['train_csv']),
          _rows(result.paths['eval_csv']))


@pytest.mark.slow
@pytest.mark.parametrize('algorithm', algorithms.ALGORITHMS)
def test_every_ring_gives_the_same_run_on_the_mlp(tmp_path, monkeypatch,
                                                  algorithm):
  runs = {r: _run(tmp_path, r, algorithm, monkeypatch) for r in RUNTIMES}
  base = runs['tff']
  assert len(base[2]) == 3 and len(base[3]) == 2  # Rounds 1-3; eval 0, 3.
  for runtime, run in runs.items():
    assert len(run[0]) == len(base[0]), runtime
    for a, b in zip(run[0], base[0]):
      np.testing.assert_array_equal(a, b, err_msg=runtime)
    assert sorted(run[1]) == sorted(base[1])
    for name in base[1]:
      np.testing.assert_array_equal(run[1][name], base[1][name],
                                    err_msg=f'{runtime} {name}')
    assert run[2] == base[2], runtime
    assert run[3] == base[3], runtime
