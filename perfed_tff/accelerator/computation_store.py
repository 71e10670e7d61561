"""TFF computations written to and read from bytes, Python containers
included.

A `tff.Computation`'s proto holds its TensorFlow graphs and its type without
the Python containers of its structures (an `OrderedDict`, TFF's
`LearningAlgorithmState`, `ModelWeights`, ...), which `ConcreteComputation`
keeps beside it so that a call returns those containers. `dumps` writes
both: the proto, and the type as JSON with each container named by its
import path; `loads` rebuilds the same computation, which a
`tff.learning.templates.LearningProcess` accepts again.

Used by `perfed_tff.accelerator.computation_cache` to skip tracing on the next
run with the same settings. Only this user's private cache folder is read.
"""

from __future__ import annotations

import importlib
import json
import struct
from typing import Any

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

_MAGIC = b'perfed_tff computation 1\n'


class StoreError(ValueError):
  """Bytes that are no stored computation, or a type this module cannot
  write (a container that cannot be imported by name)."""


def _container_name(container) -> str:
  name = f'{container.__module__}:{container.__qualname__}'
  if _container(name) is not container:
    raise StoreError(f'container {container!r} cannot be imported by name')
  return name


def _container(name: str):
  module, _, qualname = name.partition(':')
  obj = importlib.import_module(module)
  for part in qualname.split('.'):
    obj = getattr(obj, part)
  return obj


def encode_type(t) -> Any:
  """`t` (a TFF type) as JSON-able data, containers by name."""
  if t is None:
    return None
  if isinstance(t, tff.TensorType):
    shape = None if t.shape is None else [
        None if d is None else int(d) for d in t.shape]
    return {'tensor': np.dtype(t.dtype).str, 'shape': shape}
  if isinstance(t, tff.FederatedType):
    return {'federated': encode_type(t.member), 'placement': t.placement.uri,
            'all_equal': bool(t.all_equal)}
  if isinstance(t, tff.SequenceType):
    return {'sequence': encode_type(t.element)}
  if isinstance(t, tff.FunctionType):
    return {'function': [encode_type(t.parameter), encode_type(t.result)]}
  if isinstance(t, tff.StructType):
    container = (t.python_container
                 if isinstance(t, tff.StructWithPythonType) else None)
    return {'struct': [[name, encode_type(v)]
                       for name, v in structure.iter_elements(t)],
            'container': None if container is None
            else _container_name(container)}
  raise StoreError(f'cannot store type {t}')


def decode_type(data):
  """The TFF type `encode_type` wrote."""
  if data is None:
    return None
  if 'tensor' in data:
    shape = data['shape']
    return tff.TensorType(np.dtype(data['tensor']),
                          None if shape is None else tuple(shape))
  if 'federated' in data:
    return tff.FederatedType(decode_type(data['federated']),
                             tff.types.placement_from_uri(data['placement'])
                             if hasattr(tff.types, 'placement_from_uri')
                             else _placement(data['placement']),
                             all_equal=data['all_equal'])
  if 'sequence' in data:
    return tff.SequenceType(decode_type(data['sequence']))
  if 'function' in data:
    parameter, result = data['function']
    return tff.FunctionType(decode_type(parameter), decode_type(result))
  elements = [(name, decode_type(v)) for name, v in data['struct']]
  if data['container'] is None:
    return tff.StructType(elements)
  return tff.StructWithPythonType(elements, _container(data['container']))


def _placement(uri: str):
  for placement in (tff.SERVER, tff.CLIENTS):
    if placement.uri == uri:
      return placement
  raise StoreError(f'unknown placement {uri!r}')


def dumps(comp: computation_impl.ConcreteComputation) -> bytes:
  """`comp` as bytes: its proto and its type with the Python containers."""
  type_json = json.dumps(encode_type(comp.type_signature)).encode()
  proto = computation_impl.ConcreteComputation.get_proto(comp)
  return (_MAGIC + struct.pack('<Q', len(type_json)) + type_json
          + proto.SerializeToString())


def loads(data: bytes) -> computation_impl.ConcreteComputation:
  """The computation `dumps` wrote."""
  if not data.startswith(_MAGIC):
    raise StoreError('not a stored computation')
  start = len(_MAGIC) + 8
  try:
    (size,) = struct.unpack('<Q', data[len(_MAGIC):start])
    type_spec = decode_type(json.loads(data[start:start + size]))
    proto = computation_pb2.Computation.FromString(data[start + size:])
  except Exception as e:  # pylint: disable=broad-except
    raise StoreError(f'damaged stored computation ({e})') from e
  return computation_impl.ConcreteComputation(
      computation_proto=proto, context_stack=context_stack_impl.context_stack,
      annotated_type=type_spec)
