"""No retracing after the first round: rounds 2..5 add no traces.

Counted three ways: Python traces of the Per-FedAvg local step (Python code
runs only while TensorFlow traces), TFF compilations of the computations the
process invokes, and `tf.function` traces of the pure-TF floor.
"""

import collections

import pytest

from experiments import benchmarking as benchmark
from perfed_tff import per_fedavg_client_work as client_work

CONFIG = benchmark.BenchmarkConfig(
    task='digits_mlp', clients_per_round=3, num_clients=8, local_steps=2,
    batch_size=8)


@pytest.fixture(scope='module')
def task():
  return benchmark.make_task('digits_mlp', num_clients=8, seed=0)


def _round_data(runner, task, contender, round_num):
  """What `runner` consumes in round `round_num` (benchmark.round_data)."""
  return benchmark.round_data(runner, task, CONFIG, contender, round_num)


class _CompileCounter:
  """Counts TFF compilations in the installed execution context."""

  def __init__(self, context):
    self._pipeline = context.context._async_context._compiler_pipeline  # pylint: disable=protected-access
    self._inner = self._pipeline._compiler_fn  # pylint: disable=protected-access
    self.count = 0

  def __enter__(self):
    def counting(comp):
      self.count += 1
      return self._inner(comp)
    self._pipeline._compiler_fn = counting  # pylint: disable=protected-access
    return self

  def __exit__(self, *exc):
    self._pipeline._compiler_fn = self._inner  # pylint: disable=protected-access


@pytest.mark.parametrize('contender', ['per_fedavg_fo', 'per_fedavg_hf',
                                       'per_fedavg_maml'])
def test_tff_rounds_2_to_5_add_no_traces(contender, task, monkeypatch,
                                         tff_context):
  traces = collections.Counter()
  step = client_work.per_fedavg_local_step

  def counting_step(*args, **kwargs):
    traces['local_step'] += 1
    return step(*args, **kwargs)

  monkeypatch.setattr(client_work, 'per_fedavg_local_step', counting_step)
  runner = benchmark.build_contender(contender, task, CONFIG)
  after_build = traces['local_step']
  assert after_build >= 1
  with _CompileCounter(tff_context) as compiles:
    runner.run_round(_round_data(runner, task, contender, 1))
    after_round_1 = (traces['local_step'], compiles.count)
    assert compiles.count >= 1  # round 1 compiled `next`: the counter works
    for r in range(2, 6):
      runner.run_round(_round_data(runner, task, contender, r))
    assert (traces['local_step'], compiles.count) == after_round_1
  # Building traced the step; running never did.
  assert traces['local_step'] == after_build


def test_tff_fedavg_rounds_2_to_5_add_no_compilations(task, tff_context):
  runner = benchmark.build_contender('fedavg', task, CONFIG)
  with _CompileCounter(tff_context) as compiles:
    runner.run_round(_round_data(runner, task, 'fedavg', 1))
    after_round_1 = compiles.count
    assert after_round_1 >= 1
    for r in range(2, 6):
      runner.run_round(_round_data(runner, task, 'fedavg', r))
    assert compiles.count == after_round_1


@pytest.mark.parametrize('contender', ['floor_fo', 'floor_hf', 'floor_maml',
                                       'floor_fedavg'])
def test_floor_rounds_2_to_5_add_no_traces(contender, task):
  floor = benchmark.build_contender(contender, task, CONFIG)
  floor.run_round(_round_data(floor, task, contender, 1))
  assert floor.tracing_count() == 1
  for r in range(2, 6):
    floor.run_round(_round_data(floor, task, contender, r))
  assert floor.tracing_count() == 1
