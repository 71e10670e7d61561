"""The worker-side batch pipeline (`perfed_tff.data.worker_datasets`) gives
the batches and the weights of the Python-side datasets it replaced.

On this machine, one round of every algorithm on three datasets gives the
weights of the same round on the Python-side datasets bit for bit.
`tests/reference/one_round_bc8d04e.npz` holds those weights as computed at
commit bc8d04e on the developers' machine (each client's tf.data.Dataset
built in Python and sent to the worker; see
`tests/reference/make_one_round_reference.py`): TF's CPU kernels pick code
paths by the processor's instruction set, and HF's finite difference
amplifies last-bit differences, so they are compared with a tolerance.
"""

import collections
import gc
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.data import registry
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets
from perfed_tff.program import processes
from perfed_tff.program import round_data
from tests.reference import make_one_round_reference as reference

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         'reference', 'one_round_bc8d04e.npz')
# Weights of the stored reference, recorded on another machine, agree to
# this (3.7e-6 was seen on an AMD EPYC for HF on the EMNIST MLP); any change
# of the round's math moves them by far more (a step of beta = 0.1).
CROSS_MACHINE_ATOL = 2e-5


@pytest.fixture(scope='module')
def cache_dir():
  path = tempfile.mkdtemp()
  reference.write_fixtures(path)
  return path


@pytest.mark.parametrize('dataset,options', reference.CASES,
                         ids=[c[0] for c in reference.CASES])
@pytest.mark.parametrize('algorithm', reference.ALGORITHMS)
def test_one_round_matches_the_python_side_datasets(dataset, options,
                                                    algorithm, cache_dir):
  config = reference.config_for(algorithm, dataset, options, cache_dir)
  task = round_data.load_task(config)
  process = processes.build_process(config, task)
  on_worker = round_data.worker_side_process(config, task, process)
  assert on_worker is not process
  state = on_worker.initialize()
  _, inputs = round_data.round_client_inputs(config, task, 1)
  state = on_worker.next(state, inputs).state
  got = [np.asarray(w) for w in on_worker.get_model_weights(state).trainable]
  python_side = process.next(process.initialize(),
                             round_data.round_client_data(config, task, 1)[1])
  for a, b in zip(got, process.get_model_weights(
      python_side.state).trainable):
    np.testing.assert_array_equal(a, b)
  stored = np.load(REFERENCE)
  want = [stored[f'{dataset}/{algorithm}/{i}'] for i in range(len(got))]
  assert f'{dataset}/{algorithm}/{len(got)}' not in stored
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      got, process.get_model_weights(process.initialize()).trainable))
  assert moved > 1e-5  # the round trained
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=CROSS_MACHINE_ATOL)


def _python_batches(examples, seed, **kwargs):
  ds = tf.data.Dataset.from_tensor_slices(examples)
  return [tf.nest.map_structure(lambda t: t.numpy(), b)
          for b in task_lib.client_batches(ds, seed=seed, **kwargs)]


@pytest.mark.parametrize('n', [0, 1, 7, 40])
def test_worker_side_batches_equal_python_side_batches(n):
  rng = np.random.default_rng(n)
  examples = collections.OrderedDict(
      x=rng.random((n, 3, 2), dtype=np.float32),
      y=rng.integers(0, 5, n).astype(np.int32))
  spec = collections.OrderedDict(x=tf.TensorSpec([3, 2], tf.float32),
                                 y=tf.TensorSpec([], tf.int32))
  kwargs = dict(batch_size=4, num_batches=6, shuffle_buffer=1000)
  computation = worker_datasets.build_batches_computation(spec, **kwargs)

  @tff.tensorflow.computation(worker_datasets.input_type(spec))
  def stacked(client_input):   # the worker's batches, concatenated
    init = tf.nest.map_structure(
        lambda s: tf.zeros([0] + s.shape.as_list(), s.dtype), spec)
    return computation(client_input).reduce(
        init, lambda acc, b: tf.nest.map_structure(
            lambda a, t: tf.concat([a, t], 0), acc, b))

  for seed in (0, 12345, 2**31 - 1):
    want = _python_batches(examples, seed, **kwargs)
    got = stacked(worker_datasets.client_input(examples, seed))
    assert len(want) == (6 if n else 0)
    for key in ('x', 'y'):
      expected = (np.concatenate([b[key] for b in want]) if want
                  else examples[key][:0])
      np.testing.assert_array_equal(np.asarray(got[key]), expected)


def _with_tf_data_defaults(dataset):
  """`dataset` with the options `without_pipeline_rewrites` sets back at
  tf.data's defaults (the last options set win)."""
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = True
  options.autotune.enabled = True
  options.threading.private_threadpool_size = 0   # as many as cores
  return dataset.with_options(options)


def _assert_same_elements(got, want):
  got, want = list(got), list(want)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    tf.nest.map_structure(
        lambda s, t: np.testing.assert_array_equal(s.numpy(), t.numpy()),
        a, b)


def test_pipeline_options_change_no_element():
  rng = np.random.default_rng(3)
  examples = collections.OrderedDict(
      x=rng.random((37, 5), dtype=np.float32),
      y=rng.integers(0, 10, 37).astype(np.int32))
  kwargs = dict(batch_size=10, num_batches=9, shuffle_buffer=1000)
  plain = tf.data.Dataset.from_tensor_slices(examples)
  # A user's pipeline with parallel calls, which ran on the private pool.
  parallel = plain.map(
      lambda e: collections.OrderedDict(x=tf.sqrt(e['x']), y=e['y'] + 1),
      num_parallel_calls=4, deterministic=True)
  for ds in (plain, parallel):
    for seed in (0, 7, 2**31 - 1):
      # A stream reshuffles for each iterator: each is built afresh, as in
      # a round.
      def stream():
        return task_lib.client_batches(ds, seed=seed, **kwargs)
      assert stream().options().threading.private_threadpool_size == -1
      got = list(stream())
      assert len(got) == 9
      _assert_same_elements(got, _with_tf_data_defaults(stream()))


def test_a_pool_size_the_dataset_sets_is_kept():
  options = tf.data.Options()
  options.threading.private_threadpool_size = 3
  ds = tf.data.Dataset.range(5).with_options(options)
  assert task_lib.without_pipeline_rewrites(
      ds).options().threading.private_threadpool_size == 3


def _threads() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f
                if line.startswith('Threads:'))


@pytest.mark.skipif(not os.path.exists('/proc/self/status'),
                    reason='counts threads in /proc/self/status (Linux)')
def test_iterating_a_client_stream_starts_no_thread():
  ds = tf.data.Dataset.from_tensor_slices(np.arange(30, dtype=np.int64))
  stream = task_lib.client_batches(ds, batch_size=4, num_batches=3, seed=1,
                                   shuffle_buffer=100)
  count = 6

  def threads_while_iterating(pipeline):
    list(iter(pipeline))   # whatever TensorFlow starts once, it starts here
    gc.collect()
    before = _threads()
    iterators = [iter(pipeline) for _ in range(count)]
    for it in iterators:
      next(it)
    return _threads() - before

  # tf.data's default starts a private thread pool per iterator (the
  # control: were it gone, this test would no longer show anything).
  assert threads_while_iterating(_with_tf_data_defaults(stream)) >= count
  assert threads_while_iterating(stream) < count


def test_client_examples_are_read_once_and_memory_is_bounded():
  data = collections.OrderedDict(
      (f'c{k}', collections.OrderedDict(
          x=np.full((k + 1, 4), k, np.float32),
          y=np.arange(k + 1, dtype=np.int32))) for k in range(5))
  client_data = tff.simulation.datasets.TestClientData(data)
  reads = []
  row = 4 * 4 + 4   # bytes of one example (x: 4 float32, y: one int32)
  cache = worker_datasets.ClientExamples(client_data, max_bytes=6 * row)
  original = cache._open  # pylint: disable=protected-access

  def counting(cid):
    reads.append(cid)
    return original(cid)

  cache._open = counting  # pylint: disable=protected-access
  first = cache('c2')
  np.testing.assert_array_equal(first['x'], data['c2']['x'])
  np.testing.assert_array_equal(first['y'], data['c2']['y'])
  assert cache('c2') is first and reads == ['c2']
  cache('c1')                      # 3 + 2 rows: both fit
  assert cache('c2') is first and reads == ['c2', 'c1']
  cache('c3')                      # 4 more rows: the least recent (c1) goes
  assert reads == ['c2', 'c1', 'c3']
  cache('c1')
  assert reads == ['c2', 'c1', 'c3', 'c1']
  big = cache('c4')                # larger than the bound: kept alone
  assert big['x'].shape == (5, 4)


@pytest.mark.parametrize('dataset', ['emnist', 'shakespeare'])
def test_reading_clients_traces_the_pipeline_once(dataset, cache_dir):
  # An eager `create_tf_dataset_for_client` traces the client's pipeline on
  # every call, and TF keeps about 180 KB of each for good: a long run over
  # a large population grew by hundreds of MB (docs/performance.md).
  task = registry.load_task(dataset, cache_dir=cache_dir, seed=0)
  ids = list(task.client_ids)
  traces = []

  def dataset_fn(cid):
    traces.append(cid)
    return task.train.serializable_dataset_fn(cid)

  data = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      ids, dataset_fn)
  traces.clear()
  cache = worker_datasets.ClientExamples(data, max_bytes=0)
  for cid in ids * 3:
    got = cache(cid)
    want = list(task.train.create_tf_dataset_for_client(cid))
    for key, value in got.items():
      np.testing.assert_array_equal(
          value, np.stack([e[key].numpy() for e in want]) if want
          else value[:0])
  assert len(traces) == 1


def test_a_process_without_datasets_is_used_as_it_is():
  config_like = None

  class NoDatasets:
    next = tff.federated_computation(
        lambda s, d: s,
        tff.FederatedType(np.int32, tff.SERVER),
        tff.FederatedType(np.int32, tff.CLIENTS))

  assert not worker_datasets.takes_datasets(NoDatasets)
  assert round_data.worker_side_process(config_like, None,
                                        NoDatasets) is NoDatasets
