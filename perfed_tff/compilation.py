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
outside TFF. On the EMNIST CNN this brought TFF Per-FedAvg HF from 1.24x to
1.13x of the pure-TF floor (README, Performance).

It is for CPU workers. TFF inlines statically because a dataset argument of
a function call placed on a GPU cannot be copied there; `'auto'` therefore
picks `'runtime'` only for a worker started by this process on a machine
where TensorFlow sees no GPU, and TFF's own compilation (`'tff'`) otherwise.
"""

from __future__ import annotations

from typing import Callable

from absl import logging
import tensorflow as tf
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.environments.tensorflow_backend import compiled_computation_transformations
from tensorflow_federated.python.core.environments.tensorflow_backend import tensorflow_tree_transformations
from tensorflow_federated.python.core.impl.compiler import transformations
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

GRAPH_OPTIMIZATIONS = ('auto', 'runtime', 'tff')


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


def check_graph_optimization(graph_optimization: str) -> str:
  if graph_optimization not in GRAPH_OPTIMIZATIONS:
    raise ValueError(
        f'graph_optimization must be one of {GRAPH_OPTIMIZATIONS}, got '
        f'{graph_optimization!r}')
  return graph_optimization


def resolve_graph_optimization(graph_optimization: str, *,
                               local_worker: bool) -> str:
  """'runtime' or 'tff' for `graph_optimization` ('auto': 'runtime' for a
  local worker on a machine without a visible GPU, else 'tff')."""
  check_graph_optimization(graph_optimization)
  if graph_optimization != 'auto':
    return graph_optimization
  if local_worker and not tf.config.list_physical_devices('GPU'):
    return 'runtime'
  return 'tff'


def compiler_fn(graph_optimization: str, *, local_worker: bool
                ) -> Callable[[computation_impl.ConcreteComputation],
                              computation_impl.ConcreteComputation]:
  """The `compiler_fn` of a TFF execution context for `graph_optimization`."""
  if resolve_graph_optimization(
      graph_optimization, local_worker=local_worker) == 'runtime':
    return compile_with_runtime_grappler
  return native_compiler.desugar_and_transform_to_native
