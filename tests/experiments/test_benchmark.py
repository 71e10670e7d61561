"""The benchmark compares equal work, and runs end to end in a small setting.

No timing thresholds: ratios are reported by experiments/benchmark.py, never
asserted here.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import benchmark_contenders as contenders
from experiments import benchmark_lib
from experiments import benchmark_report
from experiments import benchmark_tasks
from perfed_tff import algorithms
from tests import binary_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = dict(clients_per_round=3, num_clients=6, examples_per_client=40,
            local_steps=2, batch_size=8)


def _config(task, **overrides):
  kwargs = dict(task=task, **TINY, rounds=2, warmup_rounds=1)
  kwargs.update(overrides)
  return contenders.BenchmarkConfig(**kwargs)


def _one_round(task, contender, floor, config):
  """(TFF weights, floor weights) after one round on the same batches."""
  runner = contenders.build_contender(contender, task, config)
  floor_runner = contenders.build_contender(floor, task, config)
  floor_runner.set_weights(tuple(runner.weights().trainable))
  runner.run_round(contenders.round_data(runner, task, config, contender, 0))
  floor_runner.run_round(contenders.round_data(floor_runner, task, config,
                                               floor, 0))
  return ([np.asarray(w) for w in runner.weights().trainable],
          [np.asarray(w) for w in floor_runner.weights])


@pytest.mark.parametrize('contender', ['per_fedavg_fo', 'per_fedavg_hf',
                                       'per_fedavg_maml', 'fedavg',
                                       'fedavg_reduce'])
def test_floor_and_tff_agree_after_one_round(contender):
  # The digits MLP has no dropout, so both must match to float rounding (a
  # model with dropout draws different masks in the two runtimes).
  config = _config('digits_mlp')
  task = benchmark_tasks.make_task('digits_mlp', num_clients=6, seed=0)
  tff_w, floor_w = _one_round(task, contender, contenders.FLOOR_OF[contender],
                              config)
  initial = contenders.build_contender(contender, task, config).weights()
  moved = max(float(np.max(np.abs(a - np.asarray(b))))
              for a, b in zip(tff_w, initial.trainable))
  assert moved > 1e-4  # the round did something
  for a, b in zip(tff_w, floor_w):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('contender', ['per_fedavg_maml', 'fedavg'])
def test_a_block_of_rounds_equals_as_many_single_rounds(contender):
  task = benchmark_tasks.make_task('digits_mlp', num_clients=6, seed=0)
  config = _config('digits_mlp', rounds_per_invocation=3)
  block = contenders.build_contender(contender, task, config)
  assert block.rounds_per_call == 3
  block.run_round(contenders.round_data(block, task, config, contender, 0))
  single_config = _config('digits_mlp')
  single = contenders.build_contender(contender, task, single_config)
  for r in (1, 2, 3):
    single.run_round(contenders.round_data(single, task, single_config,
                                           contender, r))
  for a, b in zip(block.weights().trainable, single.weights().trainable):
    np.testing.assert_array_equal(a, b)


def test_contenders_follow_the_library_rules_of_their_algorithm():
  assert contenders.algorithm_of('fedavg_reduce') == 'fedavg'
  for tff_contender, floor in contenders.FLOOR_OF.items():
    assert contenders.algorithm_of(floor) == contenders.algorithm_of(
        tff_contender)
  for alg, peer in contenders.PEER_OF.items():
    assert contenders.algorithm_of(peer) == alg
  assert {contenders.algorithm_of(c) for c in contenders.CONTENDERS} == set(
      algorithms.ALGORITHMS)
  with pytest.raises(ValueError, match='unknown contender'):
    contenders.algorithm_of('floor_sgd')
  config = _config('digits_mlp')
  task = benchmark_tasks.make_task('digits_mlp', num_clients=6, seed=0)
  for c in ('fedavg_reduce', 'floor_fo', 'torch_hf'):
    streams = contenders.round_datasets(task, config, c, 0)
    assert len(streams) == config.clients_per_round
    assert sum(1 for _ in streams[0]) == algorithms.batches_per_round(
        contenders.algorithm_of(c), config.local_steps)


def test_run_benchmark_small_configuration_reports_ratios():
  pytest.importorskip('torch')  # ./run.sh test installs the peer
  config = _config('digits_mlp', memory_rounds=3,
                   memory_contender='per_fedavg_fo', empty_rounds=1,
                   rounds_per_invocation=2)
  report = benchmark_lib.run_benchmark(config, log=lambda _: None)
  assert set(report['results']) == set(contenders.CONTENDERS)
  # The training program's blocks for the TFF contenders that take
  # worker-side data; TFF's own DATASET_REDUCE loop takes datasets.
  blocks = {c: r['rounds_per_invocation']
            for c, r in report['results'].items()}
  assert blocks['per_fedavg_fo'] == blocks['fedavg'] == 2
  assert blocks['fedavg_reduce'] == blocks['floor_fo'] == 1
  assert blocks['torch_fo'] == 1
  assert not report['skipped'] and report['environment']['torch']
  for alg, peer in contenders.PEER_OF.items():
    for c in (alg, contenders.FLOOR_OF[alg]):
      assert math.isfinite(report['ratios'][f'{c}/{peer}'])
  for name, r in report['results'].items():
    assert len(r['round_s']) == config.rounds, name
    assert r['median_round_s'] > 0 and r['build_s'] >= 0
  per = algorithms.gradient_evaluations_per_round
  assert report['results']['fedavg']['gradient_evaluations_per_round'] == (
      config.clients_per_round * config.local_steps)
  assert per('per_fedavg_fo', 5) == 10 and per('per_fedavg_hf', 5) == 20
  assert per('per_fedavg_maml', 5) == 15
  for key in ('per_fedavg_fo/fedavg', 'per_fedavg_hf/fedavg',
              'per_fedavg_maml/fedavg', 'per_fedavg_fo/floor_fo',
              'per_fedavg_hf/floor_hf', 'per_fedavg_maml/floor_maml'):
    assert math.isfinite(report['ratios'][key]) and report['ratios'][key] > 0
  for name, r in report['results'].items():
    assert r['empty_round_s'] > 0, name
  assert set(report['compute_ratios']) == {
      f'{c}/{contenders.FLOOR_OF[c]}' for c in contenders.FLOOR_OF}
  assert report['memory']['rounds'] == 3
  table = benchmark_report.markdown_table(report)
  assert '| per_fedavg_maml |' in table and 'pure-TF floor' in table
  assert '| torch_maml |' in table and 'vs PyTorch peer' in table
  json.dumps(report, default=str)


def _run_benchmark_script(tmp_path, contenders, *, without_torch=False):
  out = tmp_path / 'bench.json'
  env = binary_helpers.env()
  argv = ['benchmark', '--task=digits_mlp', '--clients_per_round=2',
          '--num_clients=4', '--local_steps=1', '--batch_size=8',
          '--rounds=1', '--warmup_rounds=1', f'--contenders={contenders}',
          '--empty_rounds=0', '--max_concurrent_computation_calls=1',
          f'--output_json={out}']
  # `sys.modules['torch'] = None` makes `import torch` fail, as on a
  # machine without torch.
  code = ('import sys\n'
          + ("sys.modules['torch'] = None\n" if without_torch else '')
          + f'sys.argv = {argv!r}\n'
          'from absl import app\n'
          'from experiments import benchmark\n'
          'app.run(benchmark.main)\n')
  proc = subprocess.run([sys.executable, '-c', code],
                        stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_benchmark_without_torch_skips_the_peer_with_a_message(tmp_path):
  proc, report = _run_benchmark_script(
      tmp_path, 'per_fedavg_fo,floor_fo,torch_fo', without_torch=True)
  message = 'PyTorch contenders skipped: torch is not installed'
  assert message in proc.stderr
  assert set(report['results']) == {'per_fedavg_fo', 'floor_fo'}
  assert list(report['skipped']) == ['torch_fo']
  assert report['environment']['torch'] is None
  assert '| torch_fo | skipped: ' + message in proc.stdout


@pytest.mark.slow
def test_benchmark_with_torch_times_the_peer(tmp_path):
  pytest.importorskip('torch')
  proc, report = _run_benchmark_script(tmp_path,
                                       'fedavg,per_fedavg_fo,torch_fedavg,'
                                       'torch_fo')
  assert set(report['results']) == {'fedavg', 'per_fedavg_fo',
                                    'torch_fedavg', 'torch_fo'}
  assert not report['skipped']
  assert set(report['ratios']) >= {'fedavg/torch_fedavg',
                                   'per_fedavg_fo/torch_fo'}
  assert '| torch_fo |' in proc.stdout


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
  out = tmp_path / 'bench.json'
  env = binary_helpers.env()
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark',
       '--task=synthetic', '--clients_per_round=2', '--num_clients=4',
       '--local_steps=1', '--batch_size=8', '--rounds=1', '--warmup_rounds=1',
       '--contenders=fedavg,per_fedavg_fo,floor_fo', '--empty_rounds=1',
       '--rounds_per_invocation=2',
       '--max_concurrent_computation_calls=1',
       f'--output_json={out}'],
      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
      env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| per_fedavg_fo |' in proc.stdout
  report = json.loads(out.read_text())
  assert set(report['ratios']) == {'per_fedavg_fo/fedavg',
                                   'per_fedavg_fo/floor_fo'}


def test_compilation_ab_runs_each_contender_under_both_contexts(tff_context):
  from perfed_tff.accelerator.context import AcceleratedContext  # pylint: disable=g-import-not-at-top
  config = _config('synthetic', contenders=('fedavg', 'per_fedavg_fo',
                                            'floor_fo'))
  with AcceleratedContext(graph_optimization='tff') as static:
    report = benchmark_lib.run_compilation_ab(
        config, {'auto': tff_context, 'tff': static}, log=lambda _: None)
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  assert tff.framework.get_context_stack().current is tff_context.context
  assert set(report['compilation_ab']) == {'fedavg', 'per_fedavg_fo'}
  for r in report['compilation_ab'].values():
    assert r['auto_median_round_s'] > 0 and r['tff_median_round_s'] > 0
    assert math.isfinite(r['auto/tff'])


def test_shakespeare_lstm_task_has_next_character_labels():
  task = benchmark_tasks.make_task('shakespeare_lstm', num_clients=2,
                             examples_per_client=8)
  assert len(task.clients) == 2
  x, y = task.clients['client_0000']
  assert x.shape == (2, 80) and x.dtype == np.int32
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  assert x.min() >= 1   # no padding: every position is a real character


def test_blocks_and_single_rounds_side_by_side():
  config = _config('digits_mlp', rounds_per_invocation=2,
                   contenders=('per_fedavg_fo', 'per_fedavg_fo@1',
                               'floor_fo'))
  report = benchmark_lib.run_benchmark(config, log=lambda _: None)
  results = report['results']
  assert results['per_fedavg_fo']['rounds_per_invocation'] == 2
  assert results['per_fedavg_fo@1']['rounds_per_invocation'] == 1
  for key in ('per_fedavg_fo@1/per_fedavg_fo', 'per_fedavg_fo@1/floor_fo',
              'per_fedavg_fo/floor_fo'):
    assert math.isfinite(report['ratios'][key]), key
  assert '| per_fedavg_fo@1 |' in benchmark_report.markdown_table(report)
  assert contenders.algorithm_of('per_fedavg_hf@3') == 'per_fedavg_hf'
  for bad in ('floor_fo@1', 'per_fedavg_fo@0', 'per_fedavg_fo@x'):
    with pytest.raises(ValueError, match='unknown contender'):
      contenders.split_blocks(bad)
