"""`perfed_tff.accelerator.fused_round`: a round of N clients as one TensorFlow
computation gives the federated round's weights and metrics bit for bit, for
the three Per-FedAvg variants and TFF's FedAvg, alone and in blocks, and on
a round compiled for runtime Grappler; rounds it cannot fuse are refused, not
run differently."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tensorflow_federated.python.tensorflow_libs import serialization_utils

from perfed_tff.accelerator import fused_round
from perfed_tff.accelerator import multi_round
from perfed_tff.program import processes
from perfed_tff.program import round_data
from tests import tff_helpers as h


def _leaves(value):
  return [np.asarray(v) for v in tf.nest.flatten(value)]


def _assert_identical(a, b):
  a, b = _leaves(a), _leaves(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    'algorithm',
    ['per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml', 'fedavg'])
def test_a_fused_round_is_the_federated_round(
    tmp_path, small_task, tff_context, algorithm):
  config = h.training_config(tmp_path, algorithm=algorithm, local_steps=2)
  process = processes.build_process(config, small_task)
  on_worker = round_data.worker_side_process(config, small_task, process)
  inputs = [round_data.round_client_inputs(config, small_task, r)[1]
            for r in (1, 2, 3)]
  fused = fused_round.build_fused_next(tff_context, on_worker.next,
                                       len(inputs[0]))
  assert fused is not None
  state = process.initialize()
  federated = on_worker.next(state, inputs[0])
  one_graph = fused(state, inputs[0])
  assert type(one_graph) is type(federated)
  assert type(one_graph.state) is type(federated.state)
  _assert_identical(one_graph.state, federated.state)
  assert repr(one_graph.metrics) == repr(federated.metrics)
  # In a block of two, going on from the first round's state.
  block = multi_round.build_multi_round_next(tff_context, fused, 2)
  state_3, metrics = block(federated.state, inputs[1:])
  single = federated.state
  expected = []
  for data in inputs[1:]:
    output = on_worker.next(single, data)
    single = output.state
    expected.append(output.metrics)
  _assert_identical(state_3, single)
  assert repr(metrics) == repr(expected)


def _client_sum(client_fn):
  @tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER),
                             tff.FederatedType(np.float32, tff.CLIENTS))
  def round_fn(state, data):
    return state, tff.federated_sum(tff.federated_map(client_fn, data))
  return round_fn


def test_a_round_of_another_intrinsic_is_not_fused(tff_context):
  @tff.tensorflow.computation
  def one():
    return np.float32(1.0)

  @tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER),
                             tff.FederatedType(np.float32, tff.CLIENTS))
  def round_fn(state, data):
    del data
    return state, tff.federated_sum(tff.federated_eval(one, tff.CLIENTS))

  assert fused_round.build_fused_next(tff_context, round_fn, 3) is None
  with pytest.raises(fused_round.NotFusable, match='federated_eval'):
    fused_round.unroll_clients(
        tff_context.compile(round_fn).to_building_block(), 3)


def test_a_round_left_to_runtime_grappler_is_fused_and_computes_the_same(
    tff_context):
  """A convolution inside a `tf.function`: compiled for runtime Grappler
  (`perfed_tff.accelerator.compilation`), its call keeps Grappler on in the
  fused graph and gives the federated round's numbers."""

  @tf.function
  def convolve(image):
    return tf.nn.conv2d(image, tf.reshape(tf.range(4.0), [2, 2, 1, 1]), 1,
                        'VALID')

  @tff.tensorflow.computation(np.float32)
  def convolved(x):
    return tf.reduce_sum(tf.math.sin(convolve(
        tf.reshape(tf.range(9.0) * x, [1, 3, 3, 1]))))

  round_fn = _client_sum(convolved)
  fused = fused_round.build_fused_next(tff_context, round_fn, 2)
  assert fused is not None
  graph_def = serialization_utils.unpack_graph_def(
      tff.framework.ConcreteComputation.get_proto(fused).tensorflow.graph_def)
  calls = [node for node in graph_def.node
           if node.op in ('PartitionedCall', 'StatefulPartitionedCall')]
  assert calls and not any(
      tf.compat.v1.ConfigProto.FromString(node.attr['config_proto'].s)
      .graph_options.rewrite_options.disable_meta_optimizer
      for node in calls)
  data = [np.float32(0.3), np.float32(-1.7)]
  assert fused(np.float32(1.0), data) == round_fn(np.float32(1.0), data)


def test_a_plain_round_is_fused_with_clients_in_order(tff_context):
  @tff.tensorflow.computation(np.float32)
  def squared(x):
    return x * x

  round_fn = _client_sum(squared)
  fused = fused_round.build_fused_next(tff_context, round_fn, 3)
  assert fused is not None
  state, total = fused(np.float32(2.0), [1.0, 2.0, 3.0])
  assert state == 2.0 and total == 14.0
  assert round_fn(np.float32(2.0), [1.0, 2.0, 3.0])[1] == 14.0
  with pytest.raises((TypeError, IndexError)):
    fused(np.float32(2.0), [1.0, 2.0])  # Built for three clients.
