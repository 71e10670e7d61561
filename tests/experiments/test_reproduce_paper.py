"""`python -m experiments.reproduce_paper`: a small run writes Table 1 with
every row and column; bad settings fail with one line."""

import csv
import os
import subprocess
import sys

import pytest

from tests import binary_helpers as h


def _reproduce(tmp_path, *flags, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.reproduce_paper',
       f'--output_dir={tmp_path}', *flags],
      env=h.env(), cwd=h.ROOT, capture_output=True, text=True,
      timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_small_run_writes_every_row_and_column(tmp_path):
  r = _reproduce(tmp_path, '--dataset=digits',
                 '--dataset_options=num_users=10,a=4,num_unseen_users=2',
                 '--seeds=0,1', '--tuning_seeds=100', '--grid_alphas=0.03,0.1',
                 '--grid_betas=0.1', '--rounds=2', '--clients_per_round=3',
                 '--eval_every=1')
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert set(rows[0]) >= {'algorithm', 'dataset', 'protocol',
                          'adaptation_steps', 'mean', 'std', 'values'}
  cells = {(r['algorithm'], r['protocol'], r['framing'], r['population'])
           for r in rows}
  for a in ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf'):
    for p in ('heldout', 'paper'):
      for f in ('shared', 'tuned'):
        for pop in ('seen', 'unseen'):
          assert (a, p, f, pop) in cells
  for row in rows:
    assert 0.0 <= float(row['mean']) <= 1.0          # fractions
    assert len(row['values'].split()) == 2           # one per reported seed
  md = (tmp_path / 'table.md').read_text()
  for label in ('| FedAvg |', '| Per-FedAvg (FO) |', '| Per-FedAvg (HF) |',
                'heldout protocol, shared step sizes',
                'paper protocol, tuned step sizes', 'tuned on seeds [100]'):
    assert label in md
  for name in ('curves_shared.png', 'curves_tuned.png', 'results.json'):
    assert os.path.getsize(tmp_path / name) > 0
  # The tuning seed is never reported.
  assert not list((tmp_path / 'reported').glob('*/runs/seed_100'))


def test_bad_settings_are_one_line(tmp_path):
  r = _reproduce(tmp_path, '--seeds=0,1', '--tuning_seeds=1')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      'reproduce_paper.py: error: --tuning_seeds: must not overlap the '
      'reported --seeds, got [1] in both')
  empty = tmp_path / 'keras'
  empty.mkdir()
  r = _reproduce(tmp_path, '--dataset=mnist', f'--cache_dir={empty}',
                 '--dataset_options=download=False', '--alpha=0.1',
                 '--beta=0.1')
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('reproduce_paper.py: error: --cache_dir: ')
  assert 'mnist.npz' in last and str(empty) in last
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_real_mnist_at_a_tiny_budget(tmp_path, shared_data):
  """The command README's real-MNIST table comes from, at 1 round: the
  paper's split of all 70,000 images (a = 196), both protocols."""
  r = _reproduce(tmp_path, '--dataset=mnist', f'--cache_dir={shared_data}',
                 '--seeds=0', '--alpha=0.03', '--beta=0.03', '--rounds=1',
                 '--algorithms=fedavg,per_fedavg_hf', '--eval_every=1')
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert {r['dataset'] for r in rows} == {'paper_mnist'}
  cells = {(r['algorithm'], r['protocol']): float(r['mean']) for r in rows
           if r['population'] == 'seen'}
  assert set(cells) == {(a, p) for a in ('fedavg', 'per_fedavg_hf')
                        for p in ('heldout', 'paper')}
  # One round of ten users already beats chance after one step.
  assert all(0.2 < v <= 1.0 for v in cells.values()), cells
