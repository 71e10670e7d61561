"""`perfed_tff.accelerator.multi_round` and the owned context's computation
keeping (`perfed_tff.runtime.execution`): K rounds in one invocation equal K
invocations bit for bit, for Per-FedAvg and TFF's FedAvg; a computation is
sent to the worker once per run."""

import numpy as np
import pytest

from perfed_tff.accelerator import multi_round
from perfed_tff.accelerator.context import AcceleratedContext
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.runtime import execution
from tests import tff_helpers as h


def _rounds(config, task, process, first, last):
  on_worker = round_data.worker_side_process(config, task, process)
  return on_worker, [round_data.round_client_inputs(config, task, r)[1]
                     for r in range(first, last + 1)]


@pytest.mark.parametrize('algorithm', ['per_fedavg_hf', 'fedavg'])
def test_k_rounds_in_one_invocation_equal_k_invocations(
    tmp_path, small_task, tff_context, algorithm):
  config = h.training_config(tmp_path, algorithm=algorithm, local_steps=2)
  process = processes.build_process(config, small_task)
  on_worker, inputs = _rounds(config, small_task, process, 1, 4)
  state = single = process.initialize()
  metrics = []
  for data in inputs:
    output = on_worker.next(single, data)
    single, _ = output.state, metrics.append(output.metrics)
  four = multi_round.build_multi_round_next(tff_context, on_worker.next, 4)
  blocked, block_metrics = four(state, inputs)
  assert type(blocked) is type(single)
  a = process.get_model_weights(single).trainable
  b = process.get_model_weights(blocked).trainable
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert repr(block_metrics) == repr(metrics)
  # The block's state goes on as any round's does.
  after = on_worker.next(blocked, inputs[0]).state
  again = on_worker.next(single, inputs[0]).state
  assert all(np.array_equal(x, y) for x, y in zip(
      process.get_model_weights(after).trainable,
      process.get_model_weights(again).trainable))


def test_a_computation_is_sent_to_the_worker_once(tmp_path, small_task):
  config = h.training_config(tmp_path)
  with AcceleratedContext() as context:
    process = processes.build_process(config, small_task)
    on_worker, inputs = _rounds(config, small_task, process, 1, 3)
    state = process.initialize()
    stub = context.stubs[0]
    sent = []
    create_value = stub.create_value

    def spy(request):
      sent.append(request.value.WhichOneof('value'))
      return create_value(request)

    stub.create_value = spy
    for data in inputs:
      state = on_worker.next(state, data).state
  # The round's computation once, then only the arguments of each round.
  assert sent.count('computation') == 1, sent
  assert len(sent) >= 3


def test_multi_worker_context_refuses_to_compile_blocks():
  workers = [execution.WorkerProcess() for _ in range(2)]
  try:
    with AcceleratedContext(
        workers=[w.address for w in workers]) as context:
      assert not context.single_worker
      with pytest.raises(ValueError, match='multi-worker'):
        context.compile(None)
  finally:
    for w in workers:
      w.stop()
