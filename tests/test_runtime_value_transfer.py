"""`perfed_tff.runtime.value_transfer`: the values sent to the worker are
TFF's protos byte for byte, and TFF's errors for values that do not fit; the
values received are TFF's Python values. `computation_keeping.
infer_cardinalities` finds TFF's cardinalities."""

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import cardinalities_utils
from tensorflow_federated.python.core.impl.executors import value_serialization

from perfed_tff.runtime import computation_keeping
from perfed_tff.runtime import value_transfer

Point = collections.namedtuple('Point', ['x', 'y'])
_CLIENT = tff.StructType([
    ('examples', tff.StructType([('x', tff.TensorType(np.float32, [None, 3])),
                                 ('y', tff.TensorType(np.int32, [None]))])),
    ('seed', tff.TensorType(np.int64))])


def _client(n, seed):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      examples=collections.OrderedDict(
          x=rng.random((n, 3), dtype=np.float32),
          y=rng.integers(0, 9, n).astype(np.int32)),
      seed=np.int64(seed))


@pytest.mark.parametrize('value,type_spec', [
    # Rounds of client inputs (a block), one of them empty.
    ([[_client(5, 1), _client(0, 2)], [_client(7, 3), _client(1, 4)]],
     tff.StructType([tff.StructType([_CLIENT] * 2)] * 2)),
    # Plain dicts, tuples, namedtuples (by position, as TFF), Python numbers.
    ({'b': np.ones([2], np.float32), 'a': 3.0},
     tff.StructType([('b', tff.TensorType(np.float32, [2])),
                     ('a', tff.TensorType(np.float32))])),
    (Point(x=np.zeros([2, 2], np.float32), y=[1, 2]),
     tff.StructType([('x', tff.TensorType(np.float32, [2, 2])),
                     ('y', tff.TensorType(np.int32, [2]))])),
    ((np.float32(1.5), np.int32(2), True),
     tff.StructType([np.float32, np.int32, np.bool_])),
    # Leaves left to TFF: Python lists, strings, an empty struct.
    ([1.0, 2.0], tff.TensorType(np.float32, [2])),
    (np.array([b'a', b'bc']), tff.TensorType(np.str_, [2])),
    ([], tff.StructType([])),
])
def test_the_protos_are_tffs(value, type_spec):
  ours, our_type = value_transfer.serialize_value(value, type_spec)
  theirs, their_type = value_serialization.serialize_value(value, type_spec)
  assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
      deterministic=True)
  assert our_type == their_type


@pytest.mark.parametrize('value,type_spec', [
    (np.zeros([3], np.float32), tff.TensorType(np.float32, [4])),
    (np.zeros([2], np.int32), tff.TensorType(np.float32, [2])),
    (np.arange(4, dtype=np.float64), tff.TensorType(np.float32, [4])),
    ([np.zeros([2], np.float32)], tff.StructType([np.float32, np.float32])),
])
def test_values_that_do_not_fit_raise_tffs_error(value, type_spec):
  with pytest.raises(Exception) as theirs:
    value_serialization.serialize_value(value, type_spec)
  with pytest.raises(type(theirs.value)):
    value_transfer.serialize_value(value, type_spec)


def _assert_same_values(ours, theirs):
  assert type(ours) is type(theirs)
  if isinstance(theirs, tff.structure.Struct):
    assert tff.structure.name_list_with_nones(ours) == (
        tff.structure.name_list_with_nones(theirs))
    for our_element, their_element in zip(ours, theirs):
      _assert_same_values(our_element, their_element)
  elif isinstance(theirs, np.ndarray):
    assert (ours.dtype, ours.shape, ours.flags.writeable) == (
        theirs.dtype, theirs.shape, theirs.flags.writeable)
    np.testing.assert_array_equal(ours, theirs)
  else:
    assert ours == theirs or (ours != ours and theirs != theirs)  # NaN


_STATE = tff.StructType([
    ('weights', tff.StructType([('w', tff.TensorType(np.float32, [3, 2])),
                                ('b', tff.TensorType(np.float32, [2]))])),
    ('round', tff.TensorType(np.int64)),
    ('metrics', tff.StructType([tff.TensorType(np.float32),
                                tff.TensorType(np.bool_),
                                tff.TensorType(np.uint8),
                                tff.TensorType(np.float64)]))])


@pytest.mark.parametrize('value,type_spec,hint', [
    # A state and metrics as a round returns them: numeric arrays, scalars.
    ({'weights': {'w': np.arange(6, dtype=np.float32).reshape(3, 2),
                  'b': np.array([np.nan, -0.0], np.float32)},
      'round': np.int64(2**40), 'metrics': (np.float32(0.25), np.bool_(True),
                                            np.uint8(7), np.float64(1e-300))},
     _STATE, _STATE),
    # Hints less precise than the value: unknown dimensions, unknown shape
    # rank, empty arrays.
    (np.ones([4, 2], np.int32), tff.TensorType(np.int32, [4, 2]),
     tff.TensorType(np.int32, [None, 2])),
    (np.ones([2, 2], np.float64), tff.TensorType(np.float64, [2, 2]),
     tff.TensorType(np.float64, None)),
    (np.zeros([0, 3], np.float32), tff.TensorType(np.float32, [0, 3]),
     tff.TensorType(np.float32, [None, 3])),
    # Leaves left to TFF: strings, float16 scalars, an empty struct.
    (np.array([b'a', b'bc\x00']), tff.TensorType(np.str_, [2]),
     tff.TensorType(np.str_, [2])),
    (b'abc', tff.TensorType(np.str_), tff.TensorType(np.str_)),
    ((np.float16(1.5), np.ones([2], np.float16)),
     tff.StructType([np.float16, tff.TensorType(np.float16, [2])]),
     tff.StructType([np.float16, tff.TensorType(np.float16, [2])])),
    ([], tff.StructType([]), tff.StructType([])),
])
def test_the_values_received_are_tffs(value, type_spec, hint):
  proto, _ = value_serialization.serialize_value(value, type_spec)
  theirs, _ = value_serialization.deserialize_value(proto, hint)
  _assert_same_values(value_transfer.deserialize_value(proto, hint), theirs)


@pytest.mark.parametrize('value,type_spec', [
    ([np.zeros([2])] * 3, tff.FederatedType(tff.TensorType(np.float64, [2]),
                                            tff.CLIENTS)),
    ((np.float32(1), [[1], [2]]),
     tff.StructType([np.float32, tff.FederatedType(np.int32, tff.CLIENTS)])),
    (np.float32(1), tff.FederatedType(np.float32, tff.SERVER)),
    ((np.float32(1), [np.zeros([2])] * 4),
     tff.StructType([np.float32, tff.TensorType(np.float64, [4, 2])])),
])
def test_cardinalities_are_tffs(value, type_spec):
  assert computation_keeping.infer_cardinalities(value, type_spec) == (
      cardinalities_utils.infer_cardinalities(value, type_spec))


def test_numeric_structs_are_read_without_tffs_deserializer(monkeypatch):
  value = {'weights': {'w': np.ones([3, 2], np.float32),
                       'b': np.zeros([2], np.float32)},
           'round': np.int64(1), 'metrics': (np.float32(0), np.bool_(False),
                                             np.uint8(0), np.float64(0))}
  proto, _ = value_serialization.serialize_value(value, _STATE)
  expected, _ = value_serialization.deserialize_value(proto, _STATE)

  def refuse(*args):
    raise AssertionError('TFF deserializer called')

  monkeypatch.setattr(value_serialization, 'deserialize_value', refuse)
  _assert_same_values(value_transfer.deserialize_value(proto, _STATE), expected)
