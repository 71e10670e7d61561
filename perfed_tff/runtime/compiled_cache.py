"""Compiled computations kept across runs.

Compiling a computation for the worker (`perfed_tff.runtime.compilation`:
TFF's native form, with Grappler's static pass on every TensorFlow graph)
took 0.6 s for a Per-FedAvg round and 0.4 s for its evaluation on the
digits MLP, about a tenth of the 20-round README command
(docs/performance.md). The result is a pure function of the computation's
proto and the compiler, so it is kept on disk under a key that hashes both:

  sha256(the computation's serialized proto, the compiler setting, this
         module's and `compilation`'s source, TensorFlow's and TFF's
         versions)

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

import hashlib
import os
import tempfile
from typing import Callable, Optional

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from perfed_tff.runtime import user_cache

_SUFFIX = '.pb'


def _code_version() -> bytes:
  from perfed_tff.runtime import compilation  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for module in (compilation, __import__(__name__, fromlist=['_'])):
    with open(module.__file__, 'rb') as f:
      digest.update(f.read())
  digest.update(tf.__version__.encode())
  digest.update(tff.__version__.encode())
  return digest.digest()


_CODE_VERSION: list = []


def key(comp: computation_impl.ConcreteComputation, compiler: str) -> str:
  """The cache key of compiling `comp` with the compiler named `compiler`."""
  if not _CODE_VERSION:
    _CODE_VERSION.append(_code_version())
  digest = hashlib.sha256(_CODE_VERSION[0])
  digest.update(compiler.encode() + b'\0')
  proto = computation_impl.ConcreteComputation.get_proto(comp)
  digest.update(proto.SerializeToString(deterministic=True))
  return digest.hexdigest()


def _read(path: str) -> Optional[computation_impl.ConcreteComputation]:
  if not user_cache.is_private(path):
    return None
  try:
    with open(path, 'rb') as f:
      proto = computation_pb2.Computation.FromString(f.read())
  except (OSError, ValueError, Exception):  # pylint: disable=broad-except
    return None
  try:
    os.utime(path)  # Recently used.
  except OSError:
    pass
  return computation_impl.ConcreteComputation(
      computation_proto=proto, context_stack=context_stack_impl.context_stack)


def _write(directory: str, path: str,
           comp: computation_impl.ConcreteComputation) -> None:
  data = computation_impl.ConcreteComputation.get_proto(
      comp).SerializeToString()
  try:
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', dir=directory)
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(data)
      os.replace(tmp, path)
    except BaseException:
      try:
        os.remove(tmp)
      except OSError:
        pass
      raise
  except OSError as e:  # A full or read-only disk: compile every run.
    logging.info('compiled computation not cached (%s)', e)
    return
  user_cache.prune(directory, suffix=_SUFFIX)


def compile_cached(comp: computation_impl.ConcreteComputation,
                   compiler_fn: Callable, compiler: str
                   ) -> computation_impl.ConcreteComputation:
  """`compiler_fn(comp)`, read from the cache when a run compiled the same
  computation with the same compiler (`compiler` names it) before."""
  directory = user_cache.computations_dir('compiled')
  if directory is None:
    return compiler_fn(comp)
  path = os.path.join(directory, key(comp, compiler) + _SUFFIX)
  cached = _read(path) if os.path.exists(path) else None
  if cached is not None:
    return cached
  compiled = compiler_fn(comp)
  _write(directory, path, compiled)
  return compiled
