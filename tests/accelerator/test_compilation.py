"""`perfed_tff.accelerator.compilation`: runtime-Grappler compilation keeps the client loop
a function call with Grappler enabled, computes the same round as TFF's own
compilation, and 'auto' falls back to TFF's compilation where it must."""

import collections

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import transformation_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils

import perfed_tff
from perfed_tff.accelerator import compilation
from perfed_tff.accelerator.context import AcceleratedContext
from perfed_tff.models import linear

DIM, CLASSES = 4, 3


def _process():
  return perfed_tff.build_per_fedavg(
      linear.softmax_regression_model_fn(DIM, CLASSES), variant='hf',
      alpha=0.2, beta=0.1, delta=1e-2, local_steps=2)


def _call_ops(comp):
  """(call ops with Grappler enabled, call ops in total) over every
  TensorFlow computation of `comp` (a ConcreteComputation)."""
  counts = collections.Counter()

  def visit(block):
    if (isinstance(block, building_blocks.CompiledComputation)
        and block.proto.WhichOneof('computation') == 'tensorflow'):
      graph = serialization_utils.unpack_graph_def(
          block.proto.tensorflow.graph_def)
      nodes = list(graph.node)
      for f in graph.library.function:
        nodes.extend(f.node_def)
      for node in nodes:
        if node.op in ('StatefulPartitionedCall', 'PartitionedCall'):
          counts['total'] += 1
          config = tf.compat.v1.ConfigProto.FromString(
              node.attr['config_proto'].s)
          if not config.graph_options.rewrite_options.disable_meta_optimizer:
            counts['grappler_on'] += 1
    return block, False

  transformation_utils.transform_postorder(comp.to_building_block(), visit)
  return counts['grappler_on'], counts['total']


def test_runtime_compilation_keeps_grappler_on_in_function_calls():
  next_fn = _process().next
  on, total = _call_ops(compilation.compile_with_runtime_grappler(next_fn))
  assert total >= 1 and on == total
  # TFF's compilation inlines the calls statically or disables Grappler in
  # them: nothing is left for the worker to optimize.
  on_tff, _ = _call_ops(native_compiler.desugar_and_transform_to_native(
      next_fn))
  assert on_tff == 0


def test_auto_picks_runtime_grappler_for_convolutional_models_only():
  from perfed_tff.models import emnist
  cnn = perfed_tff.build_per_fedavg(
      emnist.emnist_cnn_model_fn(num_classes=10), variant='fo', alpha=0.1,
      beta=0.1, local_steps=1)
  assert compilation.has_convolutions(cnn.next)
  assert not compilation.has_convolutions(_process().next)
  on, total = _call_ops(compilation.compile_by_model_kind(cnn.next))
  assert total >= 1 and on == total
  assert _call_ops(compilation.compile_by_model_kind(_process().next))[0] == 0


def test_both_compilations_compute_the_same_round(tff_context):
  assert tff_context.graph_optimization == 'auto'   # CPU test machine
  rng = np.random.default_rng(3)
  datasets = []
  for n in (23, 40):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    datasets.append(tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x, y=y)).batch(4))
  process = _process()

  def one_round():
    state = process.next(process.initialize(), datasets).state
    return [np.asarray(w) for w in process.get_model_weights(state).trainable]

  with AcceleratedContext(graph_optimization='runtime') as context:
    assert context.graph_optimization == 'runtime'
    runtime = one_round()
  with AcceleratedContext(graph_optimization='tff') as context:
    assert context.graph_optimization == 'tff'
    static = one_round()
  assert any(np.abs(w).max() > 0 for w in runtime)
  for a, b in zip(runtime, static):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_resolution(monkeypatch):
  assert compilation.resolve_graph_optimization(
      'auto', local_worker=True) == 'auto'
  assert (compilation.compiler_fn('auto', local_worker=True) is
          compilation.compile_by_model_kind)
  assert compilation.resolve_graph_optimization(
      'auto', local_worker=False) == 'tff'
  for explicit in ('runtime', 'tff'):
    assert compilation.resolve_graph_optimization(
        explicit, local_worker=False) == explicit
  monkeypatch.setattr(
      tf.config, 'list_physical_devices',
      lambda kind=None: ['/physical_device:GPU:0'] if kind == 'GPU' else [])
  assert compilation.resolve_graph_optimization(
      'auto', local_worker=True) == 'tff'
  assert (compilation.compiler_fn('auto', local_worker=True) is
          native_compiler.desugar_and_transform_to_native)


def test_unknown_graph_optimization_is_rejected_before_a_worker_starts():
  with pytest.raises(ValueError, match='`graph_optimization` must be one of'):
    AcceleratedContext(graph_optimization='xla')
