"""How TFF computations are compiled for the C++ worker: where Grappler runs.

TFF's native compiler (`tff.backends.native.desugar_and_transform_to_native`)
runs Grappler *statically* in Python on every TensorFlow computation, then
turns runtime Grappler off inside the worker (its sessions run with the meta
optimizer disabled, and the `config_proto` of every function-call op is
rewritten to disable it too). The static pass inlines every `tf.function`
into one graph whose nodes carry no device, so Grappler's remapper cannot
fuse anything (Conv2D+BiasAdd+ReLU, MatMul+BiasAdd, ...) and the worker runs
the client loop unfused, with TensorFlow's L0 graph optimizer.

`graph_optimization='runtime'` compiles the same way (intrinsics desugared,
call-dominant form, cache ids) but skips both steps: the client loop stays a
`tf.function` call whose body the worker optimizes with Grappler once per
session, after placement -- as TensorFlow does for the same `tf.function`
outside TFF. On the EMNIST CNN this brought TFF Per-FedAvg HF from 1.26x to
1.12x of the pure-TF floor (README, Performance).

It does not pay everywhere. In same-process A/B runs (alternating rounds,
BUILD_NOTES.md), TFF's static pass was faster on the Shakespeare char LSTM
(FedAvg 12%, HF 2.5%) and on the digits MLP (4-15%). The gain comes from fusing convolutions with their
bias and activation, so `'auto'` compiles a computation with `'runtime'` when
its graphs contain convolution ops and with TFF's compilation otherwise.

It is for CPU workers. TFF inlines statically because a dataset argument of
a function call placed on a GPU cannot be copied there; `'auto'` therefore
applies the rule above only for a worker started by this process on a
machine where TensorFlow sees no GPU, and is TFF's compilation (`'tff'`)
otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
from typing import Callable

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.environments.tensorflow_backend import compiled_computation_transformations
from tensorflow_federated.python.core.environments.tensorflow_backend import tensorflow_tree_transformations
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import transformation_utils
from tensorflow_federated.python.core.impl.compiler import transformations
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.tensorflow_libs import serialization_utils

from perfed_tff import checks

GRAPH_OPTIMIZATIONS = ('auto', 'runtime', 'tff')
# Ops whose fusions (with BiasAdd and an activation) runtime Grappler brings.
CONVOLUTION_OPS = frozenset([
    'Conv2D', 'Conv3D', 'DepthwiseConv2dNative', 'Conv2DBackpropInput',
    'Conv2DBackpropFilter'])


def compile_with_runtime_grappler(
    comp: computation_impl.ConcreteComputation,
) -> computation_impl.ConcreteComputation:
  """TFF's native compilation without static Grappler, leaving runtime
  Grappler on in the worker's function calls (see the module docstring).

  Falls back to TFF's compilation if the transformation rejects `comp`
  (TFF's own compiler does the same with its input).
  """
  try:
    desugared, _ = tensorflow_tree_transformations.replace_intrinsics_with_bodies(
        comp.to_building_block())
    call_dominant = transformations.to_call_dominant(desugared)
    with_ids, _ = compiled_computation_transformations.transform_tf_add_ids(
        call_dominant)
  except ValueError as e:
    logging.info('runtime-Grappler compilation failed (%s); using TFF\'s', e)
    return native_compiler.desugar_and_transform_to_native(comp)
  return computation_impl.ConcreteComputation(
      computation_proto=with_ids.proto,
      context_stack=context_stack_impl.context_stack)


def graph_has_convolutions(graph_def) -> bool:
  """Whether `graph_def` (functions included) has a convolution op."""
  nodes = itertools.chain(graph_def.node,
                          *[f.node_def for f in graph_def.library.function])
  return any(node.op in CONVOLUTION_OPS for node in nodes)


def model_has_convolutions(model: tff.learning.models.FunctionalModel
                           ) -> bool:
  """Whether `model`'s prediction has a convolution op (traced in a graph
  of its own)."""
  placeholder = lambda t: tf.compat.v1.placeholder(t.dtype, t.shape)
  x_spec = (model.input_spec['x'] if isinstance(model.input_spec, Mapping)
            else model.input_spec[0])
  with tf.Graph().as_default() as graph:
    model.predict_on_batch(
        tf.nest.map_structure(placeholder, model.initial_weights),
        tf.nest.map_structure(placeholder, x_spec), False)
  return graph_has_convolutions(graph.as_graph_def())


def has_convolutions(comp: computation_impl.ConcreteComputation) -> bool:
  """Whether any TensorFlow graph of `comp` (functions included) has a
  convolution op."""
  found = []

  def visit(block):
    if (not found and isinstance(block, building_blocks.CompiledComputation)
        and block.proto.WhichOneof('computation') == 'tensorflow'
        and graph_has_convolutions(serialization_utils.unpack_graph_def(
            block.proto.tensorflow.graph_def))):
      found.append(True)
    return block, False

  transformation_utils.transform_postorder(comp.to_building_block(), visit)
  return bool(found)


def compile_by_model_kind(
    comp: computation_impl.ConcreteComputation,
) -> computation_impl.ConcreteComputation:
  """`'auto'` on a local CPU worker: runtime Grappler for computations with
  convolutions, TFF's compilation for the rest (module docstring)."""
  if has_convolutions(comp):
    return compile_with_runtime_grappler(comp)
  return native_compiler.desugar_and_transform_to_native(comp)


def check_graph_optimization(graph_optimization: str) -> str:
  return checks.choice('graph_optimization', graph_optimization,
                       GRAPH_OPTIMIZATIONS)


def resolve_graph_optimization(graph_optimization: str, *,
                               local_worker: bool) -> str:
  """The setting in force: `graph_optimization` itself, except that 'auto'
  stays 'auto' (decided per computation) only for a local worker on a
  machine without a visible GPU, and is 'tff' otherwise."""
  check_graph_optimization(graph_optimization)
  if graph_optimization != 'auto':
    return graph_optimization
  if local_worker and not tf.config.list_physical_devices('GPU'):
    return 'auto'
  return 'tff'


def compiler_fn(graph_optimization: str, *, local_worker: bool
                ) -> Callable[[computation_impl.ConcreteComputation],
                              computation_impl.ConcreteComputation]:
  """The `compiler_fn` of a TFF execution context for `graph_optimization`."""
  resolved = resolve_graph_optimization(graph_optimization,
                                        local_worker=local_worker)
  if resolved == 'runtime':
    return compile_with_runtime_grappler
  if resolved == 'auto':
    return compile_by_model_kind
  return native_compiler.desugar_and_transform_to_native
