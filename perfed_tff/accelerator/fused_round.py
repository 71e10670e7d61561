"""A training round of N clients as one TensorFlow computation.

TFF's C++ worker runs a compiled round intrinsic by intrinsic: per client it
runs the dataset computation and the client computation in two TensorFlow
sessions (exporting the dataset graph between them), then one session per
client and aggregation step, then the server's. For a small model that
bookkeeping is most of the round (about 22 ms of the worker's CPU for a
digits-MLP round with no data, docs/performance.md section 7).

When a round has a known number of clients N, nothing in it needs the
federated runtime: `unroll_clients` rewrites the compiled round (TFF's
native form, every TensorFlow computation as the context compiled it) into
a local computation where a value at CLIENTS is a struct of N values and

    federated_map(f, x)          ->  <f(x_1), ..., f(x_N)>
    federated_broadcast(v)       ->  <v, ..., v>
    federated_zip_at_clients(<s_1, .., s_M>)
                                 ->  <<s_1[1], .., s_M[1]>, ..,
                                      <s_1[N], .., s_M[N]>>
    federated_aggregate(v, zero, accumulate, merge, report)
                                 ->  report(accumulate(..accumulate(zero,
                                                         v_1).., v_N))
    federated_apply(f, x), federated_value_at_server(v),
    federated_zip_at_server(s)   ->  f(x), v, s

(accumulating client by client in order, as TFF's C++ federating executor
does); `to_one_graph` then stamps every TensorFlow computation of it into
one graph, as they are (no optimization pass runs on the joined graph), so
the weights and metrics are bit-identical to the federated round
(tests/test_runtime_fused_round.py). The worker runs the round as one
session run, and its independent client pipelines in parallel.

A round compiled for runtime Grappler (`perfed_tff.accelerator.compilation`
does that for convolutional models) is fused too: its function calls keep
their configuration, so each is optimized when the worker instantiates it,
as in the federated round (`tests/test_runtime_fused_round.py` checks the
numbers on a deterministic convolution; the EMNIST CNN's dropout makes even
two federated rounds from the same state differ). On the EMNIST CNN a fused
round took 0.90-0.95 of the federated one (blocks of 3, FedAvg and FO,
docs/performance.md). A round that uses another intrinsic (secure sums, for
instance), or that TensorFlow cannot join, is not fused (`NotFusable`);
`build_fused_next` then returns None and the caller runs the federated
round.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Optional

from absl import logging
import tensorflow as tf
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.backends.mapreduce import compiler as mapreduce_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.compiler import building_block_factory
from tensorflow_federated.python.core.impl.compiler import building_blocks as bb
from tensorflow_federated.python.core.impl.compiler import transformations
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.types import computation_types as ct
from tensorflow_federated.python.core.impl.types import placements
from tensorflow_federated.python.core.impl.types import type_serialization
from tensorflow_federated.python.tensorflow_libs import serialization_utils

from perfed_tff import checks
from perfed_tff.accelerator import compiled_cache

# A fused round holds N copies of the client computations; a larger one is
# not fused (a bound on what the worker is sent and sets up at once; 10
# digits clients make 1.7-2.5 MB).
MAX_FUSED_BYTES = 64 * 1024 * 1024
_LOOP_ENTRIES = ('Enter', 'RefEnter')


class NotFusable(ValueError):
  """The round cannot be run as one TensorFlow computation."""


def local_type(type_spec: ct.Type, num_clients: int) -> ct.Type:
  """`type_spec` with `T@SERVER` as `T` and `{T}@CLIENTS` as N `T`s."""
  if isinstance(type_spec, ct.FederatedType):
    if type_spec.placement is placements.SERVER:
      return type_spec.member
    return ct.StructType([type_spec.member] * num_clients)
  if isinstance(type_spec, ct.StructType):
    return ct.StructType([(name, local_type(t, num_clients))
                          for name, t in structure.iter_elements(type_spec)])
  if isinstance(type_spec, ct.FunctionType):
    parameter = type_spec.parameter
    return ct.FunctionType(
        None if parameter is None else local_type(parameter, num_clients),
        local_type(type_spec.result, num_clients))
  return type_spec


class _Unroller:
  """`unroll_clients`: rebuilds a building block with N clients."""

  def __init__(self, num_clients: int):
    self._n = num_clients
    self._names = (f'_fused{i}' for i in itertools.count())

  def _bind(self, value, make):
    """`make(reference to value)`, with `value` evaluated once."""
    name = next(self._names)
    return bb.Block([(name, value)],
                    make(bb.Reference(name, value.type_signature)))

  def _argument(self, call, index: int, env):
    argument = call.argument
    element = (argument[index] if isinstance(argument, bb.Struct)
               else bb.Selection(argument, index=index))
    return self.convert(element, env)

  def _clients(self, reference):
    return [bb.Selection(reference, index=i) for i in range(self._n)]

  def _intrinsic(self, uri: str, call, env):
    if uri in ('federated_map', 'federated_map_all_equal'):
      fn = self._argument(call, 0, env)
      return self._bind(self._argument(call, 1, env), lambda values: bb.Struct(
          [bb.Call(fn, value) for value in self._clients(values)]))
    if uri == 'federated_apply':
      return bb.Call(self._argument(call, 0, env),
                     self._argument(call, 1, env))
    if uri == 'federated_eval_at_server':
      return bb.Call(self.convert(call.argument, env))
    if uri in ('federated_value_at_server', 'federated_zip_at_server'):
      return self.convert(call.argument, env)
    if uri in ('federated_broadcast', 'federated_value_at_clients'):
      return self._bind(self.convert(call.argument, env),
                        lambda value: bb.Struct([value] * self._n))
    if uri == 'federated_zip_at_clients':
      zipped = self.convert(call.argument, env)
      names = [name for name, _ in
               structure.iter_elements(zipped.type_signature)]
      return self._bind(zipped, lambda parts: bb.Struct([
          bb.Struct([(name, bb.Selection(bb.Selection(parts, index=j),
                                         index=i))
                     for j, name in enumerate(names)])
          for i in range(self._n)]))
    if uri == 'federated_aggregate':
      zero = self._argument(call, 1, env)
      accumulate = self._argument(call, 2, env)
      report = self._argument(call, 4, env)

      def in_client_order(values):
        steps, total = [], zero
        for value in self._clients(values):
          name = next(self._names)
          step = bb.Call(accumulate, bb.Struct([total, value]))
          steps.append((name, step))
          total = bb.Reference(name, step.type_signature)
        return bb.Block(steps, bb.Call(report, total))

      return self._bind(self._argument(call, 0, env), in_client_order)
    raise NotFusable(f'intrinsic {uri}')

  def convert(self, comp, env):
    if isinstance(comp, bb.Reference):
      return bb.Reference(comp.name, env[comp.name])
    if isinstance(comp, bb.Block):
      env, bindings = dict(env), []
      for name, value in comp.locals:
        converted = self.convert(value, env)
        env[name] = converted.type_signature
        bindings.append((name, converted))
      return bb.Block(bindings, self.convert(comp.result, env))
    if isinstance(comp, bb.Lambda):
      if comp.parameter_type is None:
        return bb.Lambda(None, None, self.convert(comp.result, env))
      parameter_type = local_type(comp.parameter_type, self._n)
      env = dict(env, **{comp.parameter_name: parameter_type})
      return bb.Lambda(comp.parameter_name, parameter_type,
                       self.convert(comp.result, env))
    if isinstance(comp, bb.Selection):
      return bb.Selection(self.convert(comp.source, env),
                          index=comp.as_index())
    if isinstance(comp, bb.Struct):
      return bb.Struct([(name, self.convert(element, env))
                        for name, element in structure.iter_elements(comp)])
    if isinstance(comp, bb.Call):
      if isinstance(comp.function, bb.Intrinsic):
        return self._intrinsic(comp.function.uri, comp, env)
      return bb.Call(self.convert(comp.function, env),
                     None if comp.argument is None
                     else self.convert(comp.argument, env))
    if isinstance(comp, (bb.CompiledComputation, bb.Literal)):
      return comp
    raise NotFusable(f'building block {type(comp).__name__}')


def unroll_clients(comp: bb.ComputationBuildingBlock,
                   num_clients: int) -> bb.ComputationBuildingBlock:
  """`comp` (a compiled federated computation) as a local computation of a
  round with `num_clients` clients (module docstring). Raises `NotFusable`
  for an intrinsic it does not rewrite."""
  checks.integer('num_clients', num_clients, 1)
  return _Unroller(num_clients).convert(comp, {})


def _without_shapes(type_spec):
  if isinstance(type_spec, ct.TensorType):
    return ct.TensorType(type_spec.dtype, None)
  if isinstance(type_spec, ct.StructType):
    return ct.StructType([(name, _without_shapes(t))
                          for name, t in structure.iter_elements(type_spec)])
  return type_spec


def _with_shapes(value, type_spec):
  if isinstance(type_spec, ct.TensorType):
    value.set_shape(type_spec.shape)
    return value
  if isinstance(type_spec, ct.StructType):
    return structure.Struct([
        (name, _with_shapes(value[i], t))
        for i, (name, t) in enumerate(structure.iter_elements(type_spec))])
  return value


class _GraphStamper:
  """Evaluates a local building block inside a TensorFlow computation being
  traced, stamping each of its TensorFlow computations into the graph."""

  def __init__(self):
    self._copies = itertools.count()

  def _stamp(self, comp: bb.CompiledComputation):
    if comp.proto.WhichOneof('computation') != 'tensorflow':
      raise NotFusable('a computation that is not TensorFlow')
    fn_type = comp.type_signature
    # The compiled graphs lost some static shapes (Grappler's pass, call
    # ops): import with the result's shapes relaxed, then set them back.
    proto = type(comp.proto)()
    proto.CopyFrom(comp.proto)
    proto.type.CopyFrom(type_serialization.serialize_type(ct.FunctionType(
        fn_type.parameter, _without_shapes(fn_type.result))))
    graph_def = serialization_utils.unpack_graph_def(
        proto.tensorflow.graph_def)
    has_loops = any(node.op in _LOOP_ENTRIES for node in graph_def.node)

    def call(*args):
      stamped = proto
      if has_loops:
        # A lowered while loop is named by its frame, which importing under
        # a name scope does not rename: each copy gets its own.
        copy = graph_def.__class__()
        copy.CopyFrom(graph_def)
        suffix = f'/fused_copy_{next(self._copies)}'.encode()
        for node in copy.node:
          if node.op in _LOOP_ENTRIES:
            node.attr['frame_name'].s += suffix
        stamped = type(proto)()
        stamped.CopyFrom(proto)
        stamped.tensorflow.graph_def.CopyFrom(
            serialization_utils.pack_graph_def(copy))
      result = computation_impl.ConcreteComputation(
          computation_proto=stamped,
          context_stack=context_stack_impl.context_stack)(*args)
      if isinstance(fn_type.result, ct.StructType):
        result = structure.from_container(result, recursive=True)
      return _with_shapes(result, fn_type.result)

    return call

  def evaluate(self, comp, bindings: dict):
    if isinstance(comp, bb.Block):
      for name, value in comp.locals:
        bindings[name] = self.evaluate(value, bindings)
      return self.evaluate(comp.result, bindings)
    if isinstance(comp, bb.CompiledComputation):
      return self._stamp(comp)
    if isinstance(comp, bb.Call):
      fn = self.evaluate(comp.function, bindings)
      if comp.argument is None:
        return fn()
      return fn(self.evaluate(comp.argument, bindings))
    if isinstance(comp, bb.Lambda):
      if comp.parameter_type is None:
        return lambda: self.evaluate(comp.result, bindings)

      def fn(argument):
        bindings[comp.parameter_name] = argument
        return self.evaluate(comp.result, bindings)

      return fn
    if isinstance(comp, bb.Reference):
      return bindings[comp.name]
    if isinstance(comp, bb.Selection):
      return self.evaluate(comp.source, bindings)[comp.as_index()]
    if isinstance(comp, bb.Struct):
      return structure.Struct([
          (name, self.evaluate(element, bindings))
          for name, element in structure.iter_elements(comp)])
    if isinstance(comp, bb.Literal):
      return tf.constant(comp.value)
    raise NotFusable(f'building block {type(comp).__name__}')


def to_one_graph(comp: bb.Lambda) -> bb.CompiledComputation:
  """`comp`, a local computation whose calls are all to TensorFlow
  computations, as one TensorFlow computation (each of them stamped in as
  it is), with a cache id so that the worker keeps its session."""
  parameter_type = comp.type_signature.parameter
  comp = mapreduce_compiler.unpack_compiled_computations(comp)
  comp = transformations.to_call_dominant(comp)
  name = next(building_block_factory.unique_name_generator(comp))
  body = bb.Call(comp, bb.Reference(name, parameter_type))

  @tensorflow_computation.tf_computation(parameter_type)
  def fused(argument):
    argument = structure.from_container(argument, recursive=True)
    return _GraphStamper().evaluate(body, {name: argument})

  block = fused.to_compiled_building_block()
  proto = type(block.proto)()
  proto.CopyFrom(block.proto)
  # TFF's worker keeps a session per cache id (TFF's compiler sets one on
  # every TensorFlow computation; `transform_tf_add_ids`).
  proto.tensorflow.cache_key.id = int.from_bytes(
      hashlib.sha256(proto.tensorflow.graph_def.value).digest()[:8], 'little')
  return bb.CompiledComputation(proto, type_signature=block.type_signature)


def _fuse(compiled_next: computation_impl.ConcreteComputation,
          num_clients: int) -> computation_impl.ConcreteComputation:
  local = unroll_clients(compiled_next.to_building_block(), num_clients)
  try:
    fused = to_one_graph(local)
  except (ValueError, TypeError, tf.errors.OpError) as e:
    if isinstance(e, NotFusable):
      raise
    raise NotFusable(f'TensorFlow could not join the round: {e}') from e
  if fused.proto.ByteSize() > MAX_FUSED_BYTES:
    raise NotFusable(f'{fused.proto.ByteSize()} bytes')
  return computation_impl.ConcreteComputation(
      computation_proto=fused.proto,
      context_stack=context_stack_impl.context_stack)


def _unplaced(type_spec: ct.Type) -> ct.Type:
  """A server-placed result type as the fused round returns it, with its
  Python containers."""
  if isinstance(type_spec, ct.FederatedType):
    return type_spec.member
  if isinstance(type_spec, ct.StructType):
    elements = [(name, _unplaced(t))
                for name, t in structure.iter_elements(type_spec)]
    container = getattr(type_spec, 'python_container', None)
    if container is not None:
      return ct.StructWithPythonType(elements, container)
    return ct.StructType(elements)
  return type_spec


def build_fused_next(context, next_fn: computation_impl.ConcreteComputation,
                     num_clients: int, *, build: bool = True
                     ) -> Optional[computation_impl.ConcreteComputation]:
  """`next_fn` (a `(state@SERVER, {data}@CLIENTS) -> (state, metrics)@SERVER`
  round) for rounds of exactly `num_clients` clients, as one TensorFlow
  computation `(state, [data of each client]) -> (state, metrics)` with
  `next_fn`'s Python containers, or None if the round cannot be fused.

  Built from `next_fn` as `context` (a single-worker
  `perfed_tff.runtime.ExecutionContext`) compiled it, registered with it to
  run as it is, and kept in `compiled_cache` (keyed by the compiled round
  and N). With `build=False`, only a kept one is returned (fusing costs
  about 0.15 s per client, once).
  """
  checks.integer('num_clients', num_clients, 1)
  compiled = context.compile(next_fn)
  name = f'fused-round:{num_clients}'
  try:
    fused = compiled_cache.compile_cached(
        compiled, lambda comp: _fuse(comp, num_clients), name,
        build=build)
  except NotFusable as e:
    logging.info('Rounds of %d clients run federated: %s', num_clients, e)
    return None
  if fused is None:
    return None
  logging.info('Rounds of %d clients run as one TensorFlow computation.',
               num_clients)
  annotated = ct.FunctionType(
      fused.type_signature.parameter,
      _unplaced(next_fn.type_signature.result))
  fused = computation_impl.ConcreteComputation(
      computation_proto=computation_impl.ConcreteComputation.get_proto(fused),
      context_stack=context_stack_impl.context_stack,
      annotated_type=annotated)
  context.add_compiled(fused)
  return fused
