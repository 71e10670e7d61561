"""No retracing after the first round: rounds 2..5 add no traces.

Counted three ways: Python traces of the Per-FedAvg local step (Python code
runs only while TensorFlow traces), TFF compilations of the computations the
process invokes, and `tf.function` traces of the pure-TF floor.
"""

import pytest

from experiments import benchmark_contenders
from experiments import benchmark_tasks
from tests import tff_helpers as h

CONFIG = benchmark_contenders.BenchmarkConfig(
    task='digits_mlp', clients_per_round=3, num_clients=8, local_steps=2,
    batch_size=8)


@pytest.fixture(scope='module')
def task():
  return benchmark_tasks.make_task('digits_mlp', num_clients=8, seed=0)


def _round_data(runner, task, contender, round_num):
  """What `runner` consumes in round `round_num`."""
  return benchmark_contenders.round_data(runner, task, CONFIG, contender,
                                         round_num)


@pytest.mark.parametrize('contender', ['per_fedavg_fo', 'per_fedavg_hf',
                                       'per_fedavg_maml'])
def test_tff_rounds_2_to_5_add_no_traces(contender, task, local_step_traces,
                                         tff_context):
  traces = local_step_traces
  runner = benchmark_contenders.build_contender(contender, task, CONFIG)
  after_build = traces['local_step']
  assert after_build >= 1
  with h.CompileCounter(tff_context) as compiles:
    runner.run_round(_round_data(runner, task, contender, 1))
    after_round_1 = (traces['local_step'], compiles.count)
    assert compiles.count >= 1  # round 1 compiled `next`: the counter works
    for r in range(2, 6):
      runner.run_round(_round_data(runner, task, contender, r))
    assert (traces['local_step'], compiles.count) == after_round_1
  # Building traced the step; running never did.
  assert traces['local_step'] == after_build


def test_tff_fedavg_rounds_2_to_5_add_no_compilations(task, tff_context):
  runner = benchmark_contenders.build_contender('fedavg', task, CONFIG)
  with h.CompileCounter(tff_context) as compiles:
    runner.run_round(_round_data(runner, task, 'fedavg', 1))
    after_round_1 = compiles.count
    assert after_round_1 >= 1
    for r in range(2, 6):
      runner.run_round(_round_data(runner, task, 'fedavg', r))
    assert compiles.count == after_round_1


@pytest.mark.parametrize('contender', ['floor_fo', 'floor_hf', 'floor_maml',
                                       'floor_fedavg'])
def test_floor_rounds_2_to_5_add_no_traces(contender, task):
  floor = benchmark_contenders.build_contender(contender, task, CONFIG)
  floor.run_round(_round_data(floor, task, contender, 1))
  assert floor.tracing_count() == 1
  for r in range(2, 6):
    floor.run_round(_round_data(floor, task, contender, r))
  assert floor.tracing_count() == 1
