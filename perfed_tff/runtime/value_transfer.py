"""Values sent to and from the worker, without TFF's cost per leaf.

TFF's `value_serialization.serialize_value` walks a value leaf by leaf with
type checks and tracing wrappers around each. A block of 10 rounds of 10
digits clients (300 arrays, 0.7 MB) took it 22 ms, of which 1.6 ms is
making the protos (docs/performance.md section 7): about 2 ms of every
round, paid in this process before the worker starts.

`serialize_value(value, type_spec)` makes the same `executor_pb2.Value`, byte
for byte (tests/test_runtime_value_transfer.py): structs as TFF makes them,
and a numpy array whose dtype is exactly the type's and whose shape fits it
directly as TFF's `array.to_proto_content` would, and a numpy scalar of
exactly the type's (numeric) dtype as TFF's `array.to_proto`. Every other
leaf (Python numbers and lists, other dtypes, strings) goes through TFF's own
serializer, which also raises TFF's errors for values that do not fit.

`deserialize_value(proto, type_spec)` is TFF's `deserialize_value(proto,
type_spec)[0]`, the same Python values (tests/test_runtime_value_transfer.py):
structs as TFF's `Struct`s, numeric tensors read as TFF's `array` module
reads them, every other leaf by TFF's own deserializer. A block's results
(the state and ten rounds' metrics) took TFF's 5-6 ms.
"""

from __future__ import annotations

import collections

import numpy as np
from tensorflow_federated.proto.v0 import array_pb2
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import array
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import array_shape
from tensorflow_federated.python.core.impl.types import computation_types
from tensorflow_federated.python.core.impl.types import dtype_utils


def _fits(array: np.ndarray, type_spec: computation_types.TensorType) -> bool:
  shape = type_spec.shape
  return (array.ndim > 0 and shape is not None
          and array.dtype.type is type_spec.dtype.type
          and array.dtype.kind not in 'OSU' and len(shape) == array.ndim
          and all(d is None or d == n for d, n in zip(shape, array.shape)))


def _elements(value) -> list:
  """The elements of a struct value, in the order TFF's
  `structure.from_container` gives them."""
  if type(value) in (list, tuple):  # Not a namedtuple.
    return value
  if type(value) in (dict, collections.OrderedDict):
    return list(value.values())
  return [element for _, element in structure.iter_elements(
      structure.from_container(value))]


def _serialize(value, type_spec) -> executor_pb2.Value:
  if isinstance(type_spec, computation_types.TensorType):
    if isinstance(value, np.ndarray) and _fits(value, type_spec):
      return executor_pb2.Value(array=array_pb2.Array(
          dtype=dtype_utils.to_proto(value.dtype.type),
          shape=array_shape.to_proto(value.shape),
          content=value.tobytes()))
    if (isinstance(value, np.generic) and type_spec.shape == ()
        and value.dtype.type is type_spec.dtype.type
        and value.dtype.kind in 'biuf'):
      return executor_pb2.Value(array=array.to_proto(
          value, dtype_hint=type_spec.dtype.type))
  elif (isinstance(type_spec, computation_types.StructType)
        and not isinstance(value, (np.ndarray, np.generic))):
    elements = _elements(value)
    if len(elements) == len(type_spec):
      struct = executor_pb2.Value.Struct()
      for (name, element_type), element in zip(
          structure.iter_elements(type_spec), elements):
        entry = struct.element.add(value=_serialize(element, element_type))
        if name:
          entry.name = name
      return executor_pb2.Value(struct=struct)
  return value_serialization.serialize_value(value, type_spec)[0]


# Where `array.from_proto` reads a numeric scalar of each dtype.
_SCALAR_FIELDS = {
    np.bool_: 'bool_list', np.int8: 'int8_list', np.int16: 'int16_list',
    np.int32: 'int32_list', np.int64: 'int64_list', np.uint8: 'uint8_list',
    np.uint16: 'uint16_list', np.uint32: 'uint32_list',
    np.uint64: 'uint64_list', np.float32: 'float32_list',
    np.float64: 'float64_list',
}


def deserialize_value(value_proto: executor_pb2.Value,
                      type_spec: computation_types.Type):
  """`value_serialization.deserialize_value(value_proto, type_spec)[0]`,
  faster for structs of numeric tensors (module docstring)."""
  which = value_proto.WhichOneof('value')
  if which == 'struct' and isinstance(type_spec, computation_types.StructType):
    elements = value_proto.struct.element
    if len(elements) == len(type_spec):
      return structure.Struct([
          (element.name or None,
           deserialize_value(element.value, element_type))
          for element, element_type in zip(elements, type_spec)])
  elif which == 'array' and isinstance(type_spec,
                                       computation_types.TensorType):
    proto = value_proto.array
    dtype = dtype_utils.from_proto(proto.dtype)
    shape = array_shape.from_proto(proto.shape)
    if array_shape.is_shape_scalar(type_spec.shape):
      field = _SCALAR_FIELDS.get(dtype)
      values = getattr(proto, field).value if field else ()
      if shape == () and len(values) == 1:
        return dtype(values[0])
    elif (type_spec.dtype.type is not np.str_ and dtype is not np.str_
          and shape and None not in shape):
      return np.frombuffer(proto.content, dtype).reshape(shape)
  return value_serialization.deserialize_value(value_proto, type_spec)[0]


def serialize_value(value, type_spec: computation_types.Type
                    ) -> tuple[executor_pb2.Value, computation_types.Type]:
  """`value_serialization.serialize_value(value, type_spec)`, faster for
  structs of numpy arrays (module docstring)."""
  if isinstance(type_spec, (computation_types.TensorType,
                            computation_types.StructType)):
    return _serialize(value, type_spec), type_spec
  return value_serialization.serialize_value(value, type_spec)
