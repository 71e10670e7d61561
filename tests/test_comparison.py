"""Comparison runs: same sampling for every algorithm, the unseen population
never trains, outputs (tables, plots), the CLI and the heterogeneity sweep."""

import collections
import csv
import dataclasses
import os

import numpy as np
import pytest

from perfed_tff import comparison
from perfed_tff import evaluation
from perfed_tff.data import task as task_lib


class _SpyClientData:
  """A ClientData stand-in that logs every dataset it creates, by phase."""

  def __init__(self, client_data, log, name):
    self._cd = client_data
    self._log = log
    self._name = name

  @property
  def client_ids(self):
    return self._cd.client_ids

  def create_tf_dataset_for_client(self, cid):
    self._log.append((self._name, cid))
    return self._cd.create_tf_dataset_for_client(cid)


def _tiny_config(**kw):
  base = dict(dataset='synthetic', num_users=6, num_unseen_users=3,
              algorithms=('fedavg', 'per_fedavg_fo'), seeds=(0,), rounds=3,
              clients_per_round=2, local_steps=1, batch_size=5, alpha=0.05,
              beta=0.05, eval_steps=(1, 2), eval_every=0)
  base.update(kw)
  return comparison.CompareConfig(**base)


def test_same_clients_and_batches_for_every_algorithm():
  config = _tiny_config(local_steps=2)
  task = comparison.load_task(config, 0)
  for r in range(3):
    ids = {}
    first = {}
    for a in ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf'):
      ids[a], data = comparison.training_client_data(task, a, config, 0, r)
      first[a] = next(iter(data[0]))['x'].numpy()
    assert ids['fedavg'] == ids['per_fedavg_fo'] == ids['per_fedavg_hf']
    assert ids['fedavg'] == task_lib.sample_clients(task.client_ids, 2, 0, r)
    # Same seed per (seed, round, client): the first batch is shared.
    np.testing.assert_array_equal(first['fedavg'], first['per_fedavg_hf'])
  _, data = comparison.training_client_data(task, 'per_fedavg_hf', config, 0, 0)
  assert len(list(data[0])) == 6  # 3 batches per step x tau = 2


def test_unseen_users_never_contribute_to_training():
  config = _tiny_config()
  task = comparison.load_task(config, 0)
  log = []
  spy_task = dataclasses.replace(
      task,
      train=_SpyClientData(task.train, log, 'train'),
      test=_SpyClientData(task.test, log, 'test'),
      unseen=(_SpyClientData(task.unseen[0], log, 'unseen_train'),
              _SpyClientData(task.unseen[1], log, 'unseen_test')))
  unseen_ids = set(task.unseen[0].client_ids)
  assert not unseen_ids & set(task.train.client_ids)
  ev = evaluation.build_personalized_evaluation(
      task.model_fn, alpha=config.alpha, adaptation_steps=config.eval_steps)
  run = comparison.train_and_evaluate(spy_task, 'per_fedavg_fo', config, 0, ev)
  training = list(log)  # eval_every=0: all rounds first, then one evaluation.
  n_train_calls = config.rounds * config.clients_per_round
  assert all(src == 'train' for src, _ in training[:n_train_calls])
  assert all(cid not in unseen_ids for _, cid in training[:n_train_calls])
  for ids in run.sampled_clients:
    assert not set(ids) & unseen_ids
  # The final evaluation reads both populations.
  sources = collections.Counter(src for src, _ in log[n_train_calls:])
  assert sources['unseen_train'] == sources['unseen_test'] == 3
  assert sources['train'] == sources['test'] == 6
  assert set(run.final) == {'seen', 'unseen'}
  assert run.final['unseen']['num_clients'] == 3


def _fake_results(algs=('fedavg', 'per_fedavg_hf'), seeds=(0, 1, 2)):
  rng = np.random.default_rng(0)

  def summary(base):
    out = {'num_clients': 5}
    for k in (0, 1, 5):
      s = {m: float(np.clip(base + 0.05 * k + rng.normal(0, 0.01), 0, 1))
           for m in comparison.SUMMARY_METRICS}
      out[f'step_{k}'] = s
    return out

  runs = []
  for seed in seeds:
    for i, a in enumerate(algs):
      curve = [(r, {'seen': summary(0.5 + 0.01 * r + 0.05 * i),
                    'unseen': summary(0.4 + 0.01 * r + 0.05 * i)})
               for r in (0, 5, 10)]
      runs.append(dict(algorithm=a, seed=seed, curve=curve, final=curve[-1][1],
                       train_seconds=1.0, eval_seconds=1.0, sampled_clients=[]))
  return {'config': dataclasses.asdict(_tiny_config(seeds=seeds,
                                                    eval_steps=(1, 5))),
          'task': 'fake', 'runs': runs}


def test_tables_and_plots(tmp_path):
  results = _fake_results()
  paths = comparison.write_outputs(results, str(tmp_path), 'fake')
  for key in ('json', 'csv', 'md', 'curves', 'bars'):
    assert os.path.getsize(paths[key]) > 0
  md = open(paths['md']).read()
  assert '| FedAvg |' in md and '| Per-FedAvg (HF) |' in md
  assert 'seen: 1 step' in md and 'unseen: 5 steps' in md and '±' in md
  rows = list(csv.DictReader(open(paths['csv'])))
  row = [r for r in rows if r['algorithm'] == 'fedavg' and
         r['population'] == 'unseen' and r['adaptation_steps'] == '1' and
         r['metric'] == 'accuracy_mean'][0]
  vals = comparison.final_metric(results, 'fedavg', 'unseen', 1)
  assert float(row['mean']) == pytest.approx(vals.mean())
  assert float(row['std']) == pytest.approx(vals.std(ddof=1))
  assert int(row['n_seeds']) == 3
  gains = comparison.gains(results)
  d = 100 * (comparison.final_metric(results, 'per_fedavg_hf', 'seen', 1)
             - comparison.final_metric(results, 'fedavg', 'seen', 1))
  assert gains[('per_fedavg_hf', 'seen')][0] == pytest.approx(d.mean())


def test_sweep_outputs(tmp_path):
  sweep = {'sweep': 'classes_per_user',
           'levels': ['1 classes/user', '2 classes/user', '5 classes/user',
                      '10 classes/user'],
           'results': [_fake_results() for _ in range(4)]}
  paths = comparison.write_sweep_outputs(sweep, str(tmp_path), 'sweep')
  assert os.path.getsize(paths['plot']) > 0
  rows = list(csv.DictReader(open(paths['csv'])))
  assert len(rows) == 4 * 2 * 2
  assert comparison.parse_levels('synthetic', '0,0;0.5,1') == [(0, 0), (0.5, 1)]
  assert comparison.parse_levels('classes_per_user', '1,2,10') == [1, 2, 10]
  cfg = comparison.sweep_config(_tiny_config(), 'synthetic', (0.5, 1.0))
  assert (cfg.synthetic_alpha, cfg.synthetic_beta) == (0.5, 1.0)


@pytest.mark.slow
def test_compare_cli_end_to_end(tmp_path):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  out = str(tmp_path)
  compare.run_with_args(['--dataset=synthetic', '--num_users=6', '--num_unseen_users=2',
                '--algorithms=fedavg,per_fedavg_hf', '--seeds=0,1',
                '--rounds=2', '--clients_per_round=2', '--local_steps=1',
                '--batch_size=5', '--eval_every=1', '--eval_steps=1,2',
                f'--output_dir={out}', '--prefix=e2e'], own_context=False)
  for suffix in ('.md', '.csv', '.json', '_curves.png', '_bars.png'):
    assert os.path.getsize(os.path.join(out, 'e2e' + suffix)) > 0
  md = open(os.path.join(out, 'e2e.md')).read()
  assert 'Per-FedAvg (HF)' in md and 'unseen: 1 step' in md
  # Tables and plots again from the saved JSON, plus the table at round 1.
  paths = compare.run_with_args([f'--replot={out}/e2e.json', '--table_rounds=1',
                        f'--output_dir={out}/replot'])
  assert '### At round 1' in open(paths['md']).read()
  compare.run_with_args(['--sweep=synthetic', '--sweep_levels=0,0;1,1',
                '--num_users=6', '--num_unseen_users=2',
                '--algorithms=fedavg,per_fedavg_fo', '--seeds=0', '--rounds=1',
                '--clients_per_round=2', '--local_steps=1', '--batch_size=5',
                '--eval_every=0', f'--output_dir={out}', '--prefix=sw'],
               own_context=False)
  assert os.path.getsize(os.path.join(out, 'sw.png')) > 0
  paths = compare.run_with_args(['--sweep=grid', '--grid_alphas=0.05,0.1',
                        '--grid_betas=0.05', '--num_users=6',
                        '--num_unseen_users=2', '--dataset=synthetic',
                        '--algorithms=fedavg,per_fedavg_fo', '--seeds=0',
                        '--rounds=1', '--clients_per_round=2',
                        '--local_steps=1', '--batch_size=5',
                        f'--output_dir={out}', '--prefix=grid'],
                       own_context=False)
  grid_md = open(paths['md']).read()
  assert '| 0.1 | Per-FedAvg (FO) |' in grid_md and 'beta=0.05' in grid_md
  assert 'Synthetic(1,1)' in open(os.path.join(out, 'sw.md')).read()
