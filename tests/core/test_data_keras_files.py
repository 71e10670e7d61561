"""Keras's dataset files read directly (`mnist.npz`, `cifar-10-batches-py/`),
on small files in the exact Keras formats; the paper_* datasets built on them.
No test touches the network (download=False or a patched urlopen)."""

import dataclasses
import hashlib
import io
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from perfed_tff.data import keras_files
from perfed_tff.data import offline
from perfed_tff.data import paper_datasets
from perfed_tff.data import registry
from tests import data_fixtures as fx

MNIST_LINE = ('MNIST is not available offline: place mnist.npz (as written by '
              'tf.keras.datasets.mnist.load_data()) in {dir} ({reason})')
CIFAR_LINE = ('CIFAR-10 is not available offline: place cifar-10-batches-py '
              '(as extracted by tf.keras.datasets.cifar10.load_data(), or '
              'cifar-10-python.tar.gz) in {dir} ({reason})')


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('keras_mnist')
  fx.write_mnist_npz(str(path), num_train=200, num_test=100)
  return str(path)


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('keras_cifar')
  fx.write_cifar10_dir(str(path), per_batch=12, num_test=20)
  return str(path)


def _no_network(monkeypatch, calls=None):
  def offline_urlopen(url, *args, **kwargs):
    if calls is not None:
      calls.append((url, kwargs.get('timeout')))
    raise urllib.error.URLError(
        '[Errno -3] Temporary failure in name resolution')
  monkeypatch.setattr(urllib.request, 'urlopen', offline_urlopen)


def test_mnist_npz_shapes_dtypes_labels_and_pixels(mnist_dir):
  path = keras_files.find_or_download('mnist', mnist_dir, download=False)
  assert path == os.path.join(mnist_dir, 'mnist.npz')
  x_train, y_train, x_test, y_test = keras_files.load_mnist_npz(path)
  assert x_train.shape == (200, 28, 28) and x_test.shape == (100, 28, 28)
  assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
  assert y_train.shape == (200,) and y_test.shape == (100,)
  assert y_train.dtype == np.int64 and y_test.dtype == np.int64
  assert set(y_train) == set(range(10)) == set(y_test)
  for i in (0, 1, 199):
    np.testing.assert_array_equal(x_train[i], fx.mnist_image(i))
    assert y_train[i] == fx.keras_label(i)
  np.testing.assert_array_equal(x_test[7], fx.mnist_image(207))
  assert y_test[7] == fx.keras_label(207)


def test_cifar_dir_shapes_and_channel_order(cifar_dir):
  path = keras_files.find_or_download('cifar10', cifar_dir, download=False)
  assert path == os.path.join(cifar_dir, 'cifar-10-batches-py')
  x_train, y_train, x_test, y_test = keras_files.load_cifar10_dir(path)
  assert x_train.shape == (60, 32, 32, 3) and x_test.shape == (20, 32, 32, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
  assert set(y_train) == set(range(10)) and y_test.shape == (20,)
  for i in (0, 13, 59):
    np.testing.assert_array_equal(x_train[i], fx.cifar_image(i))
    assert y_train[i] == fx.keras_label(i)
  np.testing.assert_array_equal(x_test[3], fx.cifar_image(63))
  # Pixel (r, c) of image 0 is (r + 2c, r + 2c + 85, r + 2c + 170) in RGB:
  # red first, rows before columns. A reshape to (N, 32, 32, 3) without the
  # transpose, or a transpose to (N, 32, 32, 3) of (c, r), would differ.
  np.testing.assert_array_equal(x_train[0, 0, 0], [0, 85, 170])
  np.testing.assert_array_equal(x_train[0, 1, 0], [1, 86, 171])
  np.testing.assert_array_equal(x_train[0, 0, 1], [2, 87, 172])
  with open(os.path.join(path, 'data_batch_1'), 'rb') as f:
    raw = pickle.load(f, encoding='bytes')[b'data']
  assert not np.array_equal(raw.reshape(-1, 32, 32, 3)[0], x_train[0])


@pytest.mark.parametrize('dataset,line', [('mnist', MNIST_LINE),
                                          ('cifar10', CIFAR_LINE)])
def test_missing_file_without_download_is_one_line(tmp_path, dataset, line):
  with pytest.raises(offline.DatasetUnavailableError) as info:
    keras_files.find_or_download(dataset, str(tmp_path), download=False)
  assert str(info.value) == line.format(dir=tmp_path,
                                        reason='download disabled')
  assert info.value.filename == keras_files.FILES[dataset].filename
  assert info.value.cache_dir == str(tmp_path)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize('dataset,line', [('mnist', MNIST_LINE),
                                          ('cifar10', CIFAR_LINE)])
def test_failed_download_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, dataset, line):
  calls = []
  _no_network(monkeypatch, calls)
  cache = tmp_path / 'keras'
  with pytest.raises(offline.DatasetUnavailableError) as info:
    keras_files.find_or_download(dataset, str(cache), timeout=3)
  assert calls == [(keras_files.FILES[dataset].url, 3.0)]
  assert str(info.value) == line.format(
      dir=cache, reason='download failed: URLError: <urlopen error [Errno -3] '
      'Temporary failure in name resolution>')
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert os.listdir(cache) == []


def _serve(monkeypatch, payload: bytes, dataset: str, sha256=None):
  """urlopen returns `payload`; Keras's hash is replaced by the payload's
  (or by `sha256`)."""
  spec = keras_files.FILES[dataset]
  digest = sha256 or hashlib.sha256(payload).hexdigest()
  monkeypatch.setitem(keras_files.FILES, dataset,
                      dataclasses.replace(spec, sha256=digest))
  monkeypatch.setattr(urllib.request, 'urlopen',
                      lambda url, timeout=None: io.BytesIO(payload))


def test_download_is_checked_and_stored_where_keras_keeps_it(
    tmp_path, monkeypatch):
  source = fx.write_mnist_npz(str(tmp_path / 'src'), 30, 10)
  with open(source, 'rb') as f:
    payload = f.read()
  _serve(monkeypatch, payload, 'mnist')
  cache = tmp_path / 'keras'
  path = keras_files.find_or_download('mnist', str(cache))
  assert path == str(cache / 'mnist.npz') and sorted(os.listdir(cache)) == [
      'mnist.npz']
  assert keras_files.load_mnist_npz(path)[0].shape == (30, 28, 28)
  # A payload whose SHA-256 is not Keras's is refused and removed.
  _serve(monkeypatch, payload, 'mnist', sha256='0' * 64)
  other = tmp_path / 'other'
  with pytest.raises(offline.DatasetUnavailableError,
                     match=r'\(download failed: ValueError: .* has SHA-256 '):
    keras_files.find_or_download('mnist', str(other))
  assert os.listdir(other) == []


def test_cifar_archive_is_downloaded_or_found_and_extracted(
    tmp_path, monkeypatch):
  archive = fx.write_cifar10_archive(str(tmp_path / 'cifar-10-python.tar.gz'),
                                     per_batch=2, num_test=3)
  with open(archive, 'rb') as f:
    payload = f.read()
  _serve(monkeypatch, payload, 'cifar10')
  cache = tmp_path / 'keras'
  path = keras_files.find_or_download('cifar10', str(cache))
  assert path == str(cache / 'cifar-10-batches-py')
  assert sorted(os.listdir(cache)) == ['cifar-10-batches-py',
                                       'cifar-10-batches-py.tar.gz']
  x_train, _, x_test, _ = keras_files.load_cifar10_dir(path)
  assert x_train.shape == (10, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
  # Offline: an archive already in the cache is extracted, no network.
  _no_network(monkeypatch)
  offline_cache = tmp_path / 'offline'
  offline_cache.mkdir()
  os.replace(archive, offline_cache / 'cifar-10-python.tar.gz')
  path = keras_files.find_or_download('cifar10', str(offline_cache),
                                      download=False)
  np.testing.assert_array_equal(keras_files.load_cifar10_dir(path)[2], x_test)


def test_keras3_cifar_layout_is_found(tmp_path):
  fx.write_cifar10_dir(str(tmp_path / 'cifar-10-batches-py-target'), 2, 3)
  path = keras_files.find_or_download('cifar10', str(tmp_path), download=False)
  assert path == str(tmp_path / 'cifar-10-batches-py-target' /
                     'cifar-10-batches-py')


def test_corrupt_files_are_one_clear_line(tmp_path):
  path = tmp_path / 'mnist.npz'
  path.write_bytes(b'this is not a zip file')
  with pytest.raises(offline.DatasetUnavailableError) as info:
    keras_files.load_mnist_npz(str(path))
  assert str(info.value) == MNIST_LINE.format(
      dir=tmp_path, reason=f'cannot read {path}: ValueError: not an .npz (zip) '
      'archive')
  np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(offline.DatasetUnavailableError,
                     match=r"no array\(s\) \['y_train', 'x_test', 'y_test'\]"):
    keras_files.load_mnist_npz(str(path))
  np.savez(path, x_train=np.zeros((2, 28, 28)), y_train=np.zeros(2, np.uint8),
           x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
  with pytest.raises(offline.DatasetUnavailableError,
                     match=r'x_train must be uint8 \(N, 28, 28\), got float64'):
    keras_files.load_arrays('mnist', str(tmp_path), download=False)

  folder = fx.write_cifar10_dir(str(tmp_path / 'c'), 2, 3)
  batch = os.path.join(folder, 'data_batch_3')
  with open(batch, 'wb') as f:
    f.write(b'\x80\x02garbage')
  with pytest.raises(offline.DatasetUnavailableError) as info:
    keras_files.load_cifar10_dir(folder)
  message = str(info.value)
  assert '\n' not in message and f'(cannot read {batch}: ' in message
  with open(batch, 'wb') as f:   # A pickle that would call a function.
    pickle.dump({b'data': os.getcwd, b'labels': []}, f, protocol=2)
  with pytest.raises(offline.DatasetUnavailableError,
                     match='UnpicklingError: refusing to load posix.getcwd'):
    keras_files.load_cifar10_dir(folder)
  os.remove(batch)
  with pytest.raises(offline.DatasetUnavailableError,
                     match=r'cannot read .*data_batch_3: FileNotFoundError'):
    keras_files.load_cifar10_dir(folder)
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'cifar-10-python.tar.gz').write_bytes(b'not gzip')
  with pytest.raises(offline.DatasetUnavailableError,
                     match=r'\(cannot extract .*cifar-10-python.tar.gz: '):
    keras_files.find_or_download('cifar10', str(tmp_path / 'bad'),
                                 download=False)
  assert os.listdir(tmp_path / 'bad') == ['cifar-10-python.tar.gz']


@pytest.mark.parametrize('kwargs,match', [
    (dict(dataset='fashion'),
     r"`dataset` must be one of \['mnist', 'cifar10'\]"),
    (dict(timeout=0), '`timeout` must be a finite number > 0'),
    (dict(download='yes'), '`download` must be True or False'),
    (dict(cache_dir=''), '`cache_dir` must be a non-empty path or None'),
])
def test_invalid_arguments(tmp_path, kwargs, match):
  args = dict(dataset='mnist', cache_dir=str(tmp_path), download=False)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    keras_files.find_or_download(**args)


def test_default_cache_dir_is_keras_home(monkeypatch, tmp_path):
  monkeypatch.delenv('KERAS_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert keras_files.default_cache_dir() == str(
      tmp_path / '.keras' / 'datasets')
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'kh'))
  assert keras_files.default_cache_dir() == str(tmp_path / 'kh' / 'datasets')


def _all_examples(data):
  return [e for cid in data.client_ids
          for e in data.create_tf_dataset_for_client(cid).as_numpy_iterator()]


def test_paper_mnist_task_from_the_fixture(mnist_dir):
  task = registry.load_task('paper_mnist', cache_dir=mnist_dir, num_users=6,
                            a=4, num_unseen_users=2, seed=0)
  assert task.name == 'paper(mnist,n=6,a=4,bg=0,mlp)'
  assert len(task.client_ids) == 6 and task.test.client_ids == task.client_ids
  assert task.unseen[0].client_ids == ['user_0006', 'user_0007']
  spec = task.element_spec
  assert spec['x'] == tf.TensorSpec([None, 784], tf.float32)
  assert spec['y'] == tf.TensorSpec([None], tf.int32)
  # Pooled train + test: image g of the fixture has label keras_label(g).
  images = {fx.mnist_image(g).tobytes(): g for g in range(300)}
  seen = set()
  sizes = []
  for data in (task.train, task.test, *task.unseen):
    for e in _all_examples(data):
      assert e['x'].shape == (784,) and e['x'].dtype == np.float32
      assert e['y'].dtype == np.int32 and 0 <= e['y'] <= 9
      assert 0.0 <= e['x'].min() and e['x'].max() <= 1.0
      g = images[np.round(e['x'] * 255).astype(np.uint8).reshape(28, 28)
                 .tobytes()]
      np.testing.assert_allclose(e['x'], fx.mnist_image(g).reshape(-1) / 255.0,
                                 rtol=1e-6)
      assert e['y'] == fx.keras_label(g) and g not in seen
      seen.add(g)
    sizes.append([len(list(data.create_tf_dataset_for_client(c)))
                  for c in data.client_ids])
  # a = 4: five-class users 5 x (3 train + 1 test); two-class users
  # 2 (1 + 1) of the low class and 8 (6 + 2) of the high one.
  assert sizes == [[15] * 3 + [7] * 3, [5] * 3 + [3] * 3, [15, 7], [5, 3]]
  assert max(seen) >= 200  # test images of the file are used too.


def test_paper_cifar10_and_emnist_tasks_from_fixtures(cifar_dir, tmp_path):
  task = registry.load_task('paper_cifar10', cache_dir=cifar_dir, num_users=2,
                            a=2, seed=1)
  assert task.name == 'paper(cifar10,n=2,a=2,bg=0,mlp)'
  assert task.element_spec['x'] == tf.TensorSpec([None, 3072], tf.float32)
  images = {fx.cifar_image(g).tobytes(): g for g in range(80)}
  for e in _all_examples(task.train) + _all_examples(task.test):
    g = images[np.round(e['x'] * 255).astype(np.uint8).reshape(32, 32, 3)
               .tobytes()]   # (row, column, channel) flattening order
    assert e['y'] == fx.keras_label(g)

  fx.write_emnist(str(tmp_path), num_clients=8, train_per_client=10,
                  test_per_client=5)
  native = registry.load_task('paper_emnist', cache_dir=str(tmp_path),
                              num_users=2, a=2, seed=0)
  flipped = registry.load_task('paper_emnist', cache_dir=str(tmp_path),
                               num_users=2, a=2, seed=0, background=0)
  assert native.name == 'paper(emnist,n=2,a=2,bg=1,mlp)'
  assert flipped.name == 'paper(emnist,n=2,a=2,bg=0,mlp)'
  pixels = [fx.emnist_pixels(k, i).reshape(-1) for k in range(8)
            for i in range(15)]
  for e, f in zip(_all_examples(native.train), _all_examples(flipped.train)):
    assert e['x'].shape == (784,) and e['y'] == f['y']
    assert any(np.array_equal(e['x'], p) for p in pixels)   # TFF's own values
    np.testing.assert_allclose(f['x'], 1.0 - e['x'])


def test_paper_digits_offline_with_the_default_a():
  task = registry.load_task('paper_digits')
  assert task.name == 'paper(digits,n=50,a=6,bg=0,mlp)'
  assert len(task.client_ids) == 50 and task.unseen is None
  assert task.element_spec['x'] == tf.TensorSpec([None, 64], tf.float32)
  examples = _all_examples(task.train)
  assert all(0.0 <= e['x'].min() and e['x'].max() <= 1.0 for e in examples)
  assert {e['x'].shape for e in examples} == {(64,)}
  counts = [len(list(task.train.create_tf_dataset_for_client(c)))
            for c in task.client_ids]
  assert counts == [25] * 25 + [12] * 25   # a = 6: 5 x 5 | 2 + 10
  assert registry.load_task('paper_digits', model='linear', num_users=4,
                            a=2).name == 'paper(digits,n=4,a=2,bg=0,linear)'


def test_registry_options_and_offline_errors(tmp_path):
  options = registry.dataset_options('paper_mnist')
  assert options == ('num_users', 'a', 'num_unseen_users', 'train_fraction',
                     'model', 'background', 'download')
  assert 'download' not in registry.dataset_options('paper_digits')
  assert {'paper_mnist', 'paper_cifar10', 'paper_emnist'} <= set(
      registry.DOWNLOADED)
  with pytest.raises(registry.DatasetUnavailableError) as info:
    registry.load_task('paper_mnist', cache_dir=str(tmp_path), download=False)
  assert str(info.value) == MNIST_LINE.format(dir=tmp_path,
                                              reason='download disabled')
  with pytest.raises(registry.DatasetUnavailableError,
                     match=r'^EMNIST is not available offline: place '
                     r'emnist_all.sqlite in .* \(download disabled\)$'):
    registry.load_task('paper_emnist', cache_dir=str(tmp_path), download=False)
  with pytest.raises(ValueError, match='`a` must be an even integer >= 2'):
    registry.load_task('paper_mnist', cache_dir=str(tmp_path), a=3)
  with pytest.raises(ValueError, match='`background` must be None, 0 or 1'):
    registry.load_task('paper_digits', background=0.5)
  with pytest.raises(ValueError, match=r'class \d has \d+ images'):
    registry.load_task('paper_digits', num_users=60)
  assert paper_datasets.PIXEL_BACKGROUND == {'digits': 0, 'mnist': 0,
                                             'cifar10': 0, 'emnist': 1}
