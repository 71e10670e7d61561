"""Compiled computations kept across runs.

Compiling a computation for the worker (`perfed_tff.accelerator.compilation`:
TFF's native form, with Grappler's static pass on every TensorFlow graph)
took 0.6 s for a Per-FedAvg round and 0.4 s for its evaluation on the
digits MLP, about a tenth of the 20-round README command
(docs/performance.md). The result is a pure function of the computation's
proto and the compiler, so it is kept on disk under a key that hashes both:

  sha256(the computation's serialized proto, the compiler setting, the
         source of this module, `compilation` and `fused_round`,
         TensorFlow's and TFF's versions)

A run with other settings traces another proto and gets another key; a run
that traces the same one (the next run of a command, a resume) reads the
compiled form instead of compiling. Nothing else about the run goes into
the key, and nothing the key does not cover can change the compiled form.

The cache is `user_cache.computations_dir('compiled')` (a folder only this
user can write; `PERFED_TFF_COMPUTATION_CACHE=off` turns it off). Entries
are written atomically; the least recently used go once the folder holds
more than `user_cache.MAX_BYTES`. An unreadable or damaged entry is
compiled again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from perfed_tff.runtime import user_cache

_SUFFIX = '.pb'


@functools.cache
def _code_version() -> bytes:
  """sha256 of the compiling code (this module, `compilation`,
  `fused_round`) and the TensorFlow and TFF versions."""
  here = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for name in ('compilation.py', 'fused_round.py', os.path.basename(__file__)):
    path = os.path.join(here, name)
    with open(path, 'rb') as f:
      digest.update(f.read())
  digest.update(f'{tf.__version__} {tff.__version__}'.encode())
  return digest.digest()


def proto_digest(comp: computation_impl.ConcreteComputation) -> bytes:
  """sha256 of `comp`'s serialized proto (deterministic)."""
  proto = computation_impl.ConcreteComputation.get_proto(comp)
  return hashlib.sha256(proto.SerializeToString(deterministic=True)).digest()


def key(digest: bytes, compiler: str) -> str:
  """The cache key of compiling the computation of `proto_digest` `digest`
  with the compiler named `compiler`."""
  return hashlib.sha256(_code_version() + compiler.encode() + b'\0'
                        + digest).hexdigest()


def _read(path: str) -> Optional[computation_impl.ConcreteComputation]:
  data = user_cache.read_entry(path)
  if data is None:
    return None
  try:
    proto = computation_pb2.Computation.FromString(data)
  except Exception:  # pylint: disable=broad-except
    return None  # Damaged: compiled again and replaced.
  return computation_impl.ConcreteComputation(
      computation_proto=proto, context_stack=context_stack_impl.context_stack)


def compile_cached(comp: computation_impl.ConcreteComputation,
                   compiler_fn: Callable, compiler: str, *,
                   digest: Optional[bytes] = None, build: bool = True
                   ) -> Optional[computation_impl.ConcreteComputation]:
  """`compiler_fn(comp)`, read from the cache when a run compiled the same
  computation with the same compiler (`compiler` names it) before.
  `digest`: `comp`'s `proto_digest`, when known. With `build=False`, only a
  cached one (None if there is none)."""
  directory = user_cache.computations_dir('compiled')
  if directory is None:
    return compiler_fn(comp) if build else None
  digest = digest or proto_digest(comp)
  path = os.path.join(directory, key(digest, compiler) + _SUFFIX)
  cached = _read(path)
  if cached is not None or not build:
    return cached
  compiled = compiler_fn(comp)
  user_cache.write_entry(
      path, [computation_impl.ConcreteComputation.get_proto(
          compiled).SerializeToString()], suffix=_SUFFIX)
  return compiled
