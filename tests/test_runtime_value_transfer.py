"""`perfed_tff.runtime.value_transfer`: the values sent to the worker are
TFF's protos byte for byte, and TFF's errors for values that do not fit."""

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import value_serialization

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
