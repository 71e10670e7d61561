"""How the owned execution context (`perfed_tff.runtime.execution`) keeps
computations: compiled once, created on the worker once.

TFF's `AsyncExecutionContext` looks a computation's compiled form up by
hashing its whole serialized proto (0.3-0.5 MB for a Per-FedAvg round) on
every call, and its `RemoteExecutor` serializes the computation, creates it
on the worker, calls it and disposes of it, on every call. Here:

* `CompilerPipeline` looks a computation object up by identity; a new
  object once by its proto's digest (equal computations share their
  compiled form, as in TFF), then in `compiled_cache` (across runs);
* `ComputationKeepingExecutor` creates each compiled computation on the
  worker once and only creates the call with each invocation's arguments,
  and sends and receives values with `value_transfer` (TFF's protos and
  Python values, without TFF's cost per leaf);
* `infer_cardinalities` does not walk an argument that has no federated
  type in it (TFF's walks every leaf: 4-6 ms for a block of ten fused
  digits rounds, whose argument is all unplaced).

docs/performance.md section 7 has the figures.
"""

from __future__ import annotations

import collections

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.executors import cardinalities_utils
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.types import computation_types
from tensorflow_federated.python.core.impl.types import type_analysis

from perfed_tff.runtime import compiled_cache
from perfed_tff.runtime import value_transfer


class IdentityCache:
  """A bounded LRU map keyed by the identity of its key objects, which it
  keeps alive (so that an id is never reused while it is in the map)."""

  def __init__(self, size: int):
    self._size = size
    self._entries = collections.OrderedDict()  # id(key) -> (key, value)

  def get(self, key):
    entry = self._entries.get(id(key))
    if entry is None or entry[0] is not key:
      return None
    self._entries.move_to_end(id(key))
    return entry[1]

  def put(self, key, value) -> None:
    self._entries[id(key)] = (key, value)
    self._entries.move_to_end(id(key))
    while len(self._entries) > self._size:
      self._entries.popitem(last=False)


# Computations a run keeps compiled and on its worker: a training process
# (next, plus a multi-round `next`), its evaluation and a few helpers.
_CACHED_COMPUTATIONS = 32


class CompilerPipeline:
  """TFF's `CompilerPipeline` without its cost per invocation: TFF's looks a
  computation up by hashing its whole serialized proto (0.3-0.5 MB for a
  Per-FedAvg round) on every call. Here a computation object is looked up
  by identity; a new object by its proto's digest (once: equal computations
  share their compiled form, as in TFF's), then in `compiled_cache` (across
  runs). `add_compiled` registers a computation that is already in the
  worker's form (it is run as it is)."""

  def __init__(self, compiler_fn, compiler: str):
    self._compiler_fn = compiler_fn
    self._compiler = compiler
    self._compiled = IdentityCache(_CACHED_COMPUTATIONS)
    self._by_digest = collections.OrderedDict()  # proto digest -> compiled

  def compile(self, comp):
    compiled = self._compiled.get(comp)
    if compiled is None:
      digest = compiled_cache.proto_digest(comp)
      compiled = self._by_digest.pop(digest, None)
      if compiled is None:
        compiled = compiled_cache.compile_cached(
            comp, self._compiler_fn, self._compiler, digest=digest)
      self._by_digest[digest] = compiled
      while len(self._by_digest) > _CACHED_COMPUTATIONS:
        self._by_digest.popitem(last=False)
      self._compiled.put(comp, compiled)
    return compiled

  def add_compiled(self, comp) -> None:
    self._compiled.put(comp, comp)


class ComputationKeepingExecutor(remote_executor.RemoteExecutor):
  """TFF's `RemoteExecutor` that creates each (compiled) computation on the
  worker once and calls it there again on every later invocation, instead of
  serializing and sending it with every call (TFF disposes of the
  computation value after each call). Values are sent and
  received by `value_transfer` (TFF's protos, without its cost per leaf). The
  values live as long as this executor (one per cardinality, see
  `ResourceManagingExecutorFactory`), at most `_CACHED_COMPUTATIONS` of
  them."""

  def __init__(self, stub):
    super().__init__(stub)
    self._computations = IdentityCache(_CACHED_COMPUTATIONS)

  async def create_value(self, value, type_spec=None):
    if not isinstance(value, computation_impl.ConcreteComputation):
      if self._stream_structs or type_spec is None:
        return await super().create_value(value, type_spec)
      self._check_has_executor_id()
      value_proto, type_spec = value_transfer.serialize_value(value, type_spec)
      response = self._stub.create_value(executor_pb2.CreateValueRequest(
          executor=self._executor_id, value=value_proto))
      return remote_executor.RemoteValue(response.value_ref, type_spec, self)
    remote = self._computations.get(value)
    if remote is None:
      remote = await super().create_value(value, type_spec)
      self._computations.put(value, remote)
    return remote

  async def _compute(self, value_ref, type_spec):
    if self._stream_structs:
      return await super()._compute(value_ref, type_spec)
    self._check_has_executor_id()
    response = self._stub.compute(executor_pb2.ComputeRequest(
        executor=self._executor_id, value_ref=value_ref))
    return value_transfer.deserialize_value(response.value, type_spec)


_HAS_FEDERATED: dict = {}  # type -> whether a FederatedType is in it


def infer_cardinalities(value, type_spec) -> dict:
  """TFF's `cardinalities_utils.infer_cardinalities`, which finds none in a
  value whose type has no federated type in it: such a value is not
  walked."""
  has_federated = _HAS_FEDERATED.get(type_spec)
  if has_federated is None:
    has_federated = type_analysis.contains(
        type_spec, lambda t: isinstance(t, computation_types.FederatedType))
    if len(_HAS_FEDERATED) < 256:
      _HAS_FEDERATED[type_spec] = has_federated
  if not has_federated:
    return {}
  return cardinalities_utils.infer_cardinalities(value, type_spec)


def keep_compiled(context, compiler: str) -> CompilerPipeline:
  """Makes `context` (a TFF Sync or Async execution context) look compiled
  computations up by identity, then in `compiled_cache`; returns its
  `CompilerPipeline`. `compiler` names its compiler function."""
  inner = getattr(context, '_async_context', context)
  pipeline = inner._compiler_pipeline  # pylint: disable=protected-access
  inner._compiler_pipeline = CompilerPipeline(pipeline._compiler_fn, compiler)  # pylint: disable=protected-access
  return inner._compiler_pipeline  # pylint: disable=protected-access
