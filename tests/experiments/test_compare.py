"""Comparison runs: same sampling for every algorithm, the unseen population
never trains, outputs (tables, plots), the CLI and the heterogeneity sweep."""

import collections
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import compare_lib
from experiments import report
from perfed_tff.data import task as task_lib
from perfed_tff.program import round_data
from perfed_tff.program import settings as settings_lib
from perfed_tff.program import training_loop
from tests import binary_helpers as h
from tests import data_fixtures


def _base(tmp_path, **kw):
  base = dict(algorithm='fedavg', dataset='synthetic',
              dataset_options={'num_users': 6, 'num_unseen_users': 3},
              rounds=3, clients_per_round=2, local_steps=1, batch_size=5,
              alpha=0.05, beta=0.05, eval_steps=(1, 2), eval_every=0,
              root_output_dir=str(tmp_path), progress=False)
  base.update(kw)
  return settings_lib.validate(settings_lib.TrainingConfig(**base))


def test_same_clients_and_batches_for_every_algorithm(tmp_path):
  config = _base(tmp_path, local_steps=2)
  task = round_data.load_task(config)
  for r in range(1, 4):
    ids = {}
    first = {}
    for a in ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf'):
      c = dataclasses.replace(config, algorithm=a)
      ids[a], data = round_data.round_client_data(c, task, r)
      first[a] = next(iter(data[0]))['x'].numpy()
    assert ids['fedavg'] == ids['per_fedavg_fo'] == ids['per_fedavg_hf']
    assert ids['fedavg'] == task_lib.sample_clients(task.client_ids, 2, 0, r)
    # Same seed per (seed, round, client): the first batch is shared.
    np.testing.assert_array_equal(first['fedavg'], first['per_fedavg_hf'])
  _, data = round_data.round_client_data(
      dataclasses.replace(config, algorithm='per_fedavg_hf'), task, 1)
  assert len(list(data[0])) == 6  # 3 batches per step x tau = 2


def test_unseen_users_never_contribute_to_training(tmp_path):
  config = _base(tmp_path, algorithm='per_fedavg_fo', eval_every=3)
  task = round_data.load_task(config)
  log = []
  _logged = lambda data, name: data_fixtures.LoggingClientData(data, log, name)
  spy_task = dataclasses.replace(
      task,
      train=_logged(task.train, 'train'), test=_logged(task.test, 'test'),
      unseen=(_logged(task.unseen[0], 'unseen_train'),
              _logged(task.unseen[1], 'unseen_test')))
  unseen_ids = set(task.unseen[0].client_ids)
  assert not unseen_ids & set(task.train.client_ids)
  result = training_loop.run_training(config, task=spy_task)
  # Training reads only the seen users' train data (each client's examples
  # once: they are cached, `perfed_tff.data.worker_datasets`); the
  # evaluations read both populations; no unseen user is ever read as a
  # training user, and no round samples one.
  seen_ids = set(task.client_ids)
  read = collections.defaultdict(set)
  for src, cid in log:
    read[src].add(cid)
  assert read['train'] <= seen_ids and read['test'] <= seen_ids
  assert read['train'] == seen_ids   # the batch-size check reads them all
  assert read['unseen_train'] == read['unseen_test'] <= unseen_ids
  assert len(read['unseen_train']) == 3
  for r in range(1, config.rounds + 1):
    ids, _ = round_data.round_client_inputs(config, spy_task, r)
    assert len(ids) == config.clients_per_round
    assert not set(ids) & unseen_ids
  assert result.eval_metrics['unseen/num_clients'] == 3


def _comparison(tmp_path, algorithms=('fedavg', 'per_fedavg_fo'),
                seeds=(0, 1), **kw):
  return compare_lib.Comparison(base=_base(tmp_path, **kw),
                               algorithms=algorithms, seeds=seeds)


def test_comparison_is_a_set_of_training_runs(tmp_path):
  spec = _comparison(tmp_path, eval_every=2)
  run_dir = str(tmp_path / 'cmp')
  results = compare_lib.run_comparison(spec, run_dir, write=lambda s: None)
  assert [(r['algorithm'], r['seed']) for r in results['runs']] == [
      ('fedavg', 0), ('per_fedavg_fo', 0), ('fedavg', 1),
      ('per_fedavg_fo', 1)]
  for run in results['runs']:
    assert [r for r, _ in run['curve']] == [0, 2, 3]
    assert set(run['final']) == {'seen', 'unseen'}
    assert 0 <= run['final']['seen']['step_1']['accuracy_mean'] <= 1
  # The same run as train.py's loop with the same settings and seed.
  single = training_loop.run_training(
      dataclasses.replace(spec.base, algorithm='per_fedavg_fo', seed=1,
                          eval_every=2,
                          root_output_dir=str(tmp_path / 'single')))
  h.assert_weights_close(
      h.final_weights(os.path.join(run_dir, 'runs', 'seed_1',
                                   'per_fedavg_fo')),
      h.final_weights(single.output_dir), atol=0)
  # Rerunning reads every finished run back: same results, nothing retrained.
  again = compare_lib.run_comparison(spec, run_dir, write=lambda s: None)
  assert again['runs'] == results['runs']


def test_comparison_names_its_run_directory_from_the_settings(tmp_path):
  a = compare_lib.default_name(_comparison(tmp_path))
  assert a == compare_lib.default_name(_comparison(tmp_path))
  assert a != compare_lib.default_name(_comparison(tmp_path, rounds=4))
  assert a.startswith('compare_synthetic_')


def _fake_results(algs=('fedavg', 'per_fedavg_hf'), seeds=(0, 1, 2)):
  rng = np.random.default_rng(0)

  def summary(base):
    out = {'num_clients': 5}
    for k in (0, 1, 5):
      s = {m: float(np.clip(base + 0.05 * k + rng.normal(0, 0.01), 0, 1))
           for m in report.SUMMARY_METRICS}
      out[f'step_{k}'] = s
    return out

  runs = []
  for seed in seeds:
    for i, a in enumerate(algs):
      curve = [(r, {'seen': summary(0.5 + 0.01 * r + 0.05 * i),
                    'unseen': summary(0.4 + 0.01 * r + 0.05 * i)})
               for r in (0, 5, 10)]
      runs.append(dict(algorithm=a, seed=seed, curve=curve, final=curve[-1][1],
                       train_seconds=1.0))
  return {'config': {'seeds': list(seeds), 'eval_steps': [1, 5],
                     'alpha': 0.05}, 'task': 'fake', 'runs': runs}


def test_tables_and_plots(tmp_path):
  results = _fake_results()
  paths = report.write_outputs(results, str(tmp_path), 'fake')
  for key in ('json', 'csv', 'md', 'curves', 'bars'):
    assert os.path.getsize(paths[key]) > 0
  md = open(paths['md']).read()
  assert '| FedAvg |' in md and '| Per-FedAvg (HF) |' in md
  assert 'seen: 1 step' in md and 'unseen: 5 steps' in md and '±' in md
  rows = list(csv.DictReader(open(paths['csv'])))
  row = [r for r in rows if r['algorithm'] == 'fedavg' and
         r['population'] == 'unseen' and r['adaptation_steps'] == '1' and
         r['metric'] == 'accuracy_mean'][0]
  vals = report.final_metric(results, 'fedavg', 'unseen', 1)
  assert float(row['mean']) == pytest.approx(vals.mean())
  assert float(row['std']) == pytest.approx(vals.std(ddof=1))
  assert int(row['n_seeds']) == 3
  gains = report.gains(results)
  d = 100 * (report.final_metric(results, 'per_fedavg_hf', 'seen', 1)
             - report.final_metric(results, 'fedavg', 'seen', 1))
  assert gains[('per_fedavg_hf', 'seen')][0] == pytest.approx(d.mean())


def test_sweep_outputs(tmp_path):
  sweep = {'sweep': 'dataset_options',
           'levels': ['classes_per_user=1', 'classes_per_user=2',
                      'classes_per_user=5', 'classes_per_user=10'],
           'results': [_fake_results() for _ in range(4)]}
  paths = report.write_sweep_outputs(sweep, str(tmp_path), 'sweep')
  assert os.path.getsize(paths['plot']) > 0
  rows = list(csv.DictReader(open(paths['csv'])))
  assert len(rows) == 4 * 2 * 2
  assert compare_lib.parse_levels('alpha=0,beta=0;alpha=0.5,beta=1') == [
      {'alpha': 0, 'beta': 0}, {'alpha': 0.5, 'beta': 1}]


def test_tables_without_fedavg_or_with_one_seed(tmp_path):
  results = _fake_results(algs=('per_fedavg_fo', 'per_fedavg_hf'))
  paths = report.write_outputs(results, str(tmp_path), 'nofedavg')
  assert os.path.getsize(paths['md']) > 0 and report.gains(results) == {}
  one = _fake_results(seeds=(0,))
  md = open(report.write_outputs(one, str(tmp_path), 'one')['md']).read()
  assert 'nan' not in md and 'one seed: no spread' in md


def _compare(tmp_path, *flags, timeout=400):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.compare', '--dataset=synthetic',
       '--dataset_options=num_users=6,num_unseen_users=2',
       '--clients_per_round=2', '--local_steps=1', '--batch_size=5',
       '--noprogress', f'--root_output_dir={tmp_path}', *flags],
      env=h.env(), cwd=h.ROOT, capture_output=True, text=True,
      timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_compare_cli_end_to_end(tmp_path):
  r = _compare(tmp_path, '--algorithms=fedavg,per_fedavg_hf', '--seeds=0,1',
               '--rounds=2', '--eval_every=1', '--eval_steps=1,2',
               f'--output_dir={tmp_path}/out', '--prefix=e2e')
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / 'out'
  for suffix in ('.md', '.csv', '.json', '_curves.png', '_bars.png'):
    assert os.path.getsize(out / ('e2e' + suffix)) > 0
  md = (out / 'e2e.md').read_text()
  assert 'Per-FedAvg (HF)' in md and 'unseen: 1 step' in md
  # The run directory holds the same tables and one folder per run.
  run_dirs = [d for d in os.listdir(tmp_path) if d.startswith('compare_')]
  assert len(run_dirs) == 1
  assert sorted(os.listdir(tmp_path / run_dirs[0] / 'runs' / 'seed_1')) == [
      'fedavg', 'per_fedavg_hf']
  # Tables and plots again from the saved JSON, plus the table at round 1.
  r = _compare(tmp_path, f'--replot={out}/e2e.json', '--table_rounds=1',
               f'--output_dir={out}/replot')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '### At round 1' in (out / 'replot' / 'e2e.md').read_text()
  r = _compare(tmp_path, ("--sweep_levels=model_heterogeneity=0,input_heterogeneity=0;"
                "model_heterogeneity=1,input_heterogeneity=1"),
               '--algorithms=fedavg,per_fedavg_fo', '--seeds=0', '--rounds=1',
               '--eval_every=1', f'--output_dir={out}', '--prefix=sw')
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.getsize(out / 'sw.png') > 0
  assert 'model_heterogeneity=1,input_heterogeneity=1' in (
      out / 'sw.md').read_text()
  r = _compare(tmp_path, '--grid_alphas=0.05,0.1', '--grid_betas=0.05',
               '--algorithms=fedavg,per_fedavg_fo', '--seeds=0',
               '--rounds=1', f'--output_dir={out}', '--prefix=grid')
  assert r.returncode == 0, r.stderr[-3000:]
  grid_md = (out / 'grid.md').read_text()
  assert '| 0.1 | Per-FedAvg (FO) |' in grid_md and 'beta=0.05' in grid_md


def test_compare_cli_bad_flags(tmp_path):
  r = _compare(tmp_path, '--algorithms=fedavg,sgd')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "compare.py: error: --algorithms: must be one of ['fedavg', "
      "'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml'], got 'sgd'")
  r = _compare(tmp_path, '--seeds=0,x')
  assert r.returncode == 2 and '--seeds: must be integers' in r.stderr
  r = _compare(tmp_path, '--algorithms=fedavg', '--step_sizes=per_fedavg_hf:alpha=1')
  assert r.returncode == 2 and '--step_sizes: must be algorithm:' in r.stderr


def test_table_rounds_that_are_not_evaluated_are_refused_up_front(tmp_path):
  """--table_rounds is checked against the evaluation rounds (0, every
  --eval_every, the last) before anything trains: one line, exit 2, no run
  directory."""
  r = _compare(tmp_path, '--algorithms=fedavg', '--seeds=0', '--rounds=4',
               '--eval_every=2', '--table_rounds=2,5')
  assert r.returncode == 2, r.stderr[-3000:]
  line = h.assert_one_error_line(r.stderr, 'compare.py')
  assert line == ('compare.py: error: --table_rounds: 5 is not an evaluation '
                  'round of this comparison (--rounds=4, --eval_every=2) '
                  '(evaluated at rounds 0, 2, 4); choose among them or '
                  'change --eval_every'), line
  assert not [d for d in os.listdir(tmp_path) if d.startswith('compare_')]
  config = _base(tmp_path, rounds=7, eval_every=3)
  assert compare_lib.evaluation_rounds(config) == [0, 3, 6, 7]
  assert compare_lib.evaluation_rounds(
      dataclasses.replace(config, eval_every=0)) == [0, 7]


def test_replot_of_a_bad_file_names_the_flag_and_the_file(tmp_path):
  binary = tmp_path / 'binary.json'
  binary.write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe\x00')
  garbled = tmp_path / 'garbled.json'
  garbled.write_text('{"runs": [')
  other = tmp_path / 'other.json'
  other.write_text('{"a": 1}')
  missing = tmp_path / 'missing.json'
  for path, why in ((binary, 'it is not text'), (garbled, 'invalid JSON'),
                    (other, 'is JSON but not the results of a comparison'),
                    (missing, 'does not exist')):
    r = _compare(tmp_path, f'--replot={path}')
    assert r.returncode == 2, r.stderr[-3000:]
    line = h.assert_one_error_line(r.stderr, 'compare.py')
    assert line.startswith(f'compare.py: error: --replot: {path} '), line
    assert why in line and 'resume' not in line, line
  assert sorted(os.listdir(tmp_path)) == [
      'binary.json', 'garbled.json', 'other.json']
  # A saved comparison: --table_rounds must be among its curve rounds.
  saved = tmp_path / 'saved.json'
  saved.write_text(json.dumps(_fake_results()))
  rounds = compare_lib.curve_rounds(_fake_results())
  r = _compare(tmp_path, f'--replot={saved}',
               f'--table_rounds={max(rounds) + 1}')
  assert r.returncode == 2, r.stderr[-3000:]
  line = h.assert_one_error_line(r.stderr, 'compare.py')
  assert f'--table_rounds: {max(rounds) + 1} is not an evaluation round of ' \
      f'{saved}' in line, line


def test_unreachable_worker_on_a_fresh_comparison_is_no_resume(tmp_path):
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()  # Nobody listens.
  r = _compare(tmp_path, '--algorithms=fedavg', '--seeds=0', '--rounds=1',
               '--eval_every=0', f'--workers=localhost:{port}',
               '--worker_timeout=1')
  assert r.returncode == 2, r.stderr[-3000:]
  line = h.assert_one_error_line(r.stderr, 'compare.py')
  assert line.startswith(f'compare.py: error: --workers: no TFF worker '
                         f'answered at localhost:{port} within 1s'), line
  assert f'perfed_tff.runtime.worker --port={port}' in line, line
  assert 'resume' not in line, line


def test_per_algorithm_step_sizes(tmp_path):
  spec = compare_lib.Comparison(
      base=_base(tmp_path, rounds=1), algorithms=('fedavg', 'per_fedavg_fo'),
      seeds=(0,), step_sizes={'per_fedavg_fo': {'alpha': 0.2, 'beta': 0.3}})
  results = compare_lib.run_comparison(spec, str(tmp_path / 'cmp'),
                                      write=lambda s: None)
  sizes = {r['algorithm']: (r['alpha'], r['beta']) for r in results['runs']}
  assert sizes == {'fedavg': (0.05, 0.05), 'per_fedavg_fo': (0.2, 0.3)}
  assert results['config']['step_sizes'] == {
      'per_fedavg_fo': {'alpha': 0.2, 'beta': 0.3}}


@pytest.mark.slow
def test_killed_comparison_resumes_with_the_same_tables(tmp_path):
  flags = ('--algorithms=fedavg,per_fedavg_fo', '--seeds=0,1', '--rounds=6',
           '--eval_every=2', '--checkpoint_every=2', '--prefix=t')
  whole = _compare(tmp_path / 'whole', *flags,
                   f'--output_dir={tmp_path}/whole_out')
  assert whole.returncode == 0, whole.stderr[-3000:]
  # Kill -9 once the second run is half done, then rerun the command.
  root = tmp_path / 'killed'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'experiments.compare', '--dataset=synthetic',
       '--dataset_options=num_users=6,num_unseen_users=2',
       '--clients_per_round=2', '--local_steps=1', '--batch_size=5',
       '--noprogress', f'--root_output_dir={root}', *flags],
      env=h.env(), cwd=h.ROOT, stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  csv_path = None
  while time.monotonic() < deadline:
    found = list(root.glob('*/runs/seed_0/per_fedavg_fo/metrics/train.csv'))
    if found and max(h.csv_rounds(found[0]) or [0]) >= 3:
      csv_path = found[0]
      break
    assert proc.poll() is None, 'comparison ended before it was killed'
    time.sleep(0.05)
  assert csv_path is not None
  h.kill9(proc)
  run_dir = csv_path.parents[4]
  first_run = run_dir / 'runs' / 'seed_0' / 'fedavg'
  files = [first_run / 'final_model.npz', first_run / 'metrics' / 'train.csv']
  mtimes = [os.path.getmtime(f) for f in files]
  again = _compare(root, *flags, f'--output_dir={tmp_path}/killed_out')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming from round' in again.stderr
  assert [os.path.getmtime(f) for f in files] == mtimes  # not retrained
  for name in ('t.md', 't.csv'):
    assert ((tmp_path / 'killed_out' / name).read_text().replace(
        str(root), '') == (tmp_path / 'whole_out' / name).read_text().replace(
            str(tmp_path / 'whole'), ''))


@pytest.mark.slow
def test_train_binary_and_one_algorithm_compare_give_identical_weights(
    tmp_path):
  common = ('--dataset=synthetic',
            '--dataset_options=num_users=6,num_unseen_users=2',
            '--clients_per_round=2', '--local_steps=2', '--batch_size=5',
            '--rounds=3', '--eval_every=0', '--noprogress', '--alpha=0.05',
            '--beta=0.05')
  train = subprocess.run(
      [sys.executable, '-m', 'experiments.train', *common,
       '--algorithm=per_fedavg_hf', '--seed=3',
       f'--root_output_dir={tmp_path / "train"}'],
      env=h.env(), cwd=h.ROOT, capture_output=True, text=True, timeout=400,
      stdin=subprocess.DEVNULL)
  assert train.returncode == 0, train.stderr[-3000:]
  compare = subprocess.run(
      [sys.executable, '-m', 'experiments.compare', *common,
       '--algorithms=per_fedavg_hf', '--seeds=3',
       f'--run_dir={tmp_path / "compare"}'],
      env=h.env(), cwd=h.ROOT, capture_output=True, text=True, timeout=400,
      stdin=subprocess.DEVNULL)
  assert compare.returncode == 0, compare.stderr[-3000:]
  h.assert_weights_close(
      h.final_weights(tmp_path / 'train' / 'per_fedavg_hf'),
      h.final_weights(tmp_path / 'compare' / 'runs' / 'seed_3' /
                      'per_fedavg_hf'), atol=0)
