"""How the accelerated execution context (`perfed_tff.accelerator.context`)
keeps computations: compiled once, created on the worker once.

TFF's `AsyncExecutionContext` looks a computation's compiled form up by
hashing its whole serialized proto (0.3-0.5 MB for a Per-FedAvg round) on
every call, and its `RemoteExecutor` serializes the computation, creates it
on the worker, calls it and disposes of it, on every call. Here:

* `CompilerPipeline` looks a computation object up by identity; a new
  object once by its proto's digest (equal computations share their
  compiled form, as in TFF), then in `compiled_cache` (across runs);
* `ComputationKeepingExecutor` creates each compiled computation on the
  worker once and only creates the call with each invocation's arguments.

docs/performance.md section 7 has the figures.
"""

from __future__ import annotations

import collections

from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.executors import remote_executor

from perfed_tff.accelerator import compiled_cache


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
  computation value after each call). The values live as long as this
  executor (one per cardinality, see `ResourceManagingExecutorFactory`), at
  most `_CACHED_COMPUTATIONS` of them."""

  def __init__(self, stub):
    super().__init__(stub)
    self._computations = IdentityCache(_CACHED_COMPUTATIONS)

  async def create_value(self, value, type_spec=None):
    if not isinstance(value, computation_impl.ConcreteComputation):
      return await super().create_value(value, type_spec)
    remote = self._computations.get(value)
    if remote is None:
      remote = await super().create_value(value, type_spec)
      self._computations.put(value, remote)
    return remote


def keep_compiled(context, compiler: str) -> CompilerPipeline:
  """Makes `context` (a TFF Sync or Async execution context) look compiled
  computations up by identity, then in `compiled_cache`; returns its
  `CompilerPipeline`. `compiler` names its compiler function."""
  inner = getattr(context, '_async_context', context)
  pipeline = inner._compiler_pipeline  # pylint: disable=protected-access
  inner._compiler_pipeline = CompilerPipeline(pipeline._compiler_fn, compiler)  # pylint: disable=protected-access
  return inner._compiler_pipeline  # pylint: disable=protected-access
