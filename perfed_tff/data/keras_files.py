"""Reading the dataset files Keras leaves in `~/.keras/datasets/`, directly.

`tf.keras.datasets.*.load_data()` re-checks a file hash and re-downloads a file
it does not recognise, so it cannot be pointed at a local copy or a test
fixture. Here the files are read as they are:

* MNIST: `mnist.npz`, arrays `x_train` (N, 28, 28) uint8, `y_train` (N,),
  `x_test`, `y_test` (read with `np.load(allow_pickle=False)`).
* CIFAR-10: the extracted `cifar-10-batches-py/` folder, Python pickles
  `data_batch_1`..`data_batch_5` and `test_batch` (encoding='bytes'), each a
  dict with b'data' (10000, 3072) uint8 in channel-major order (1024 red, 1024
  green, 1024 blue values, rows top to bottom) and b'labels' (list of ints).
  Images are returned as (N, 32, 32, 3) (reshape (N, 3, 32, 32), transpose).
  The pickles are read by an unpickler that only admits NumPy's array
  reconstruction, so a tampered file cannot run code.

Images are returned as stored (uint8, 0 = black, the background of MNIST);
labels as int64 in 0..9.

`find_or_download(dataset, cache_dir)` finds the file (Keras 2 and Keras 3
layouts; a CIFAR-10 archive already there is extracted without network) or,
when allowed, downloads it with a socket timeout, checks Keras's SHA-256 and
stores it where Keras would. Every failure, including a corrupt file, is an
`offline.DatasetUnavailableError` (a ValueError) with a one-line message such
as "MNIST is not available offline: place mnist.npz (as written by
tf.keras.datasets.mnist.load_data()) in /home/u/.keras/datasets (download
failed: URLError: <urlopen error timed out>)".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import Optional

import numpy as np

from perfed_tff import checks
from perfed_tff.data import offline

DEFAULT_TIMEOUT = 10.0
CIFAR_DIRNAME = 'cifar-10-batches-py'
CIFAR_TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR_TEST_BATCH = 'test_batch'


@dataclasses.dataclass(frozen=True)
class KerasFile:
  """Where Keras keeps one dataset and where it comes from."""
  display: str       # name in messages
  filename: str      # file (MNIST) or folder (CIFAR-10) under the cache dir
  written_by: str    # how a user makes the file
  url: str
  sha256: str        # of the downloaded file (Keras's `file_hash`)
  locations: tuple   # relative paths that are accepted, in order
  archives: tuple = ()  # relative paths of archives holding `filename`
  folder: bool = False  # `filename` is a folder (CIFAR-10), not a file


FILES = {
    'mnist': KerasFile(
        display='MNIST', filename='mnist.npz',
        written_by='as written by tf.keras.datasets.mnist.load_data()',
        url='https://storage.googleapis.com/tensorflow/tf-keras-datasets/'
            'mnist.npz',
        sha256='731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1',
        locations=('mnist.npz',)),
    'cifar10': KerasFile(
        display='CIFAR-10', filename=CIFAR_DIRNAME,
        written_by='as extracted by tf.keras.datasets.cifar10.load_data(), or '
                   'cifar-10-python.tar.gz',
        url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        sha256='6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce',
        # Keras 2, then Keras 3 ('<fname>-target' folder) layouts.
        locations=(CIFAR_DIRNAME,
                   os.path.join('cifar-10-batches-py-target', CIFAR_DIRNAME)),
        archives=('cifar-10-batches-py.tar.gz',
                  'cifar-10-batches-py-target_archive',
                  'cifar-10-python.tar.gz'),
        folder=True),
}
DATASETS = tuple(FILES)


def default_cache_dir() -> str:
  """Keras's dataset cache: `$KERAS_HOME/datasets`, else `~/.keras/datasets`."""
  home = os.environ.get('KERAS_HOME') or os.path.join(
      os.path.expanduser('~'), '.keras')
  return os.path.abspath(os.path.join(home, 'datasets'))


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
  """Absolute `cache_dir`, or `default_cache_dir()` when None."""
  directory = checks.nonempty_path('cache_dir', cache_dir, optional=True)
  return default_cache_dir() if directory is None else directory


def _unavailable(spec: KerasFile, directory: str,
                 reason) -> offline.DatasetUnavailableError:
  """The one-line error; `.filename` is the bare file name."""
  error = offline.DatasetUnavailableError(
      spec.display, f'{spec.filename} ({spec.written_by})', directory, reason)
  error.filename = spec.filename
  return error


def _labels(values, n: int, what: str) -> np.ndarray:
  y = np.asarray(values)
  if y.size == 0:
    y = y.astype(np.int64)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{what} must be {n} integer labels, got dtype {y.dtype} '
                     f'shape {y.shape}')
  if n and (y.min() < 0 or y.max() > 9):
    raise ValueError(f'{what} has labels outside 0..9')
  return y.astype(np.int64)


def _read_mnist(path: str):
  if not zipfile.is_zipfile(path):
    raise ValueError('not an .npz (zip) archive')
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test')
               if k not in f.files]
    if missing:
      raise ValueError(f'no array(s) {missing} (has {sorted(f.files)})')
    out = []
    for split in ('train', 'test'):
      x = f[f'x_{split}']
      if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f'x_{split} must be uint8 (N, 28, 28), got '
                         f'{x.dtype} {x.shape}')
      out += [x, _labels(f[f'y_{split}'], len(x), f'y_{split}')]
  return tuple(out)


def load_mnist_npz(path: str):
  """(x_train, y_train, x_test, y_test) from a Keras `mnist.npz`.

  x: uint8 (N, 28, 28) as stored (0 = black background, 255 = ink); y: int64
  (N,) in 0..9.

  Raises:
    offline.DatasetUnavailableError: missing, unreadable or malformed file
      (one line naming the file).
  """
  path = checks.nonempty_path('path', path)
  spec = FILES['mnist']
  if not os.path.isfile(path):
    raise _unavailable(spec, os.path.dirname(path), f'{path} not found')
  try:
    return _read_mnist(path)
  except Exception as e:  # pylint: disable=broad-except
    raise _unavailable(spec, os.path.dirname(path),
                       f'cannot read {path}: {offline.short_reason(e)}'
                       ) from None


_PICKLE_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('copyreg', '_reconstructor'),
    ('_codecs', 'encode'),  # bytes in protocol-2 pickles written by Python 3
})


class _ArrayUnpickler(pickle.Unpickler):
  """Admits only what a pickled dict of NumPy arrays needs."""

  def find_class(self, module, name):
    if (module, name) not in _PICKLE_GLOBALS:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
    return super().find_class(module, name)


def _read_cifar_batch(path: str):
  with open(path, 'rb') as f:
    batch = _ArrayUnpickler(f, encoding='bytes').load()
  if not isinstance(batch, dict) or b'data' not in batch or (
      b'labels' not in batch):
    raise ValueError("not a CIFAR batch (a dict with b'data' and b'labels')")
  data = batch[b'data']
  if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
      or data.ndim != 2 or data.shape[1] != 3 * 32 * 32):
    raise ValueError(f"b'data' must be uint8 (N, 3072), got "
                     f'{getattr(data, "dtype", type(data).__name__)} '
                     f'{getattr(data, "shape", "")}')
  return data, _labels(batch[b'labels'], len(data), "b'labels'")


def load_cifar10_dir(path: str):
  """(x_train, y_train, x_test, y_test) from an extracted
  `cifar-10-batches-py/` folder.

  x: uint8 (N, 32, 32, 3) RGB, channels last (0 = black); y: int64 (N,) in
  0..9. The five data batches are concatenated in order.

  Raises:
    offline.DatasetUnavailableError: missing folder or batch, unreadable or
      malformed batch (one line naming the file).
  """
  path = checks.nonempty_path('path', path)
  spec = FILES['cifar10']
  if not os.path.isdir(path):
    raise _unavailable(spec, os.path.dirname(path), f'{path} not found')
  parts = {}
  for name in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
    file = os.path.join(path, name)
    try:
      parts[name] = _read_cifar_batch(file)
    except Exception as e:  # pylint: disable=broad-except
      raise _unavailable(spec, os.path.dirname(path),
                         f'cannot read {file}: {offline.short_reason(e)}'
                         ) from None

  def images(data):
    return np.ascontiguousarray(
        data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1))

  x_train = images(np.concatenate([parts[n][0] for n in CIFAR_TRAIN_BATCHES]))
  y_train = np.concatenate([parts[n][1] for n in CIFAR_TRAIN_BATCHES])
  x_test, y_test = parts[CIFAR_TEST_BATCH]
  return x_train, y_train, images(x_test), y_test


def _find(spec: KerasFile, directory: str) -> Optional[str]:
  exists = os.path.isdir if spec.folder else os.path.isfile
  for rel in spec.locations:
    path = os.path.join(directory, rel)
    if exists(path):
      return path
  return None


def _extract_members(tar: tarfile.TarFile, target: str):
  if hasattr(tarfile, 'data_filter'):  # Python >= 3.11.4 / 3.12.
    tar.extractall(target, filter='data')
    return
  for member in tar.getmembers():  # Older Pythons: refuse unsafe members.
    name = os.path.normpath(member.name)
    if (os.path.isabs(name) or name.startswith('..')
        or not (member.isfile() or member.isdir())):
      raise ValueError(f'unsafe archive member {member.name!r}')
  tar.extractall(target)  # nosec: members checked above.


def _extract_cifar(archive: str, directory: str) -> str:
  """Extracts `cifar-10-batches-py/` of `archive` into `directory`."""
  target = os.path.join(directory, CIFAR_DIRNAME)
  scratch = tempfile.mkdtemp(prefix='.cifar-extract-', dir=directory)
  try:
    with tarfile.open(archive, 'r:*') as tar:
      _extract_members(tar, scratch)
    source = os.path.join(scratch, CIFAR_DIRNAME)
    if not os.path.isdir(source):
      raise ValueError(f'no {CIFAR_DIRNAME}/ folder inside')
    os.replace(source, target)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return target


def _download(url: str, path: str, sha256: str, timeout: float):
  """Streams `url` to `path` (via `path.part`) and checks its SHA-256."""
  partial = path + '.part'
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(
        partial, 'wb') as out:
      while True:
        chunk = response.read(1 << 20)
        if not chunk:
          break
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != sha256:
      raise ValueError(f'{url} has SHA-256 {digest.hexdigest()[:12]}..., '
                       f'expected {sha256[:12]}...')
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def find_or_download(dataset: str, cache_dir: Optional[str] = None, *,
                     download: bool = True,
                     timeout: float = DEFAULT_TIMEOUT) -> str:
  """Path of `mnist.npz` ('mnist') or of `cifar-10-batches-py/` ('cifar10').

  Looks in `cache_dir` (default `default_cache_dir()`: `~/.keras/datasets`)
  for Keras's file (for CIFAR-10 also Keras 3's
  `cifar-10-batches-py-target/cifar-10-batches-py/`); a CIFAR-10 archive
  already there (`cifar-10-batches-py.tar.gz`,
  `cifar-10-batches-py-target_archive` or `cifar-10-python.tar.gz`) is
  extracted. Otherwise, only when `download`, fetches it from Keras's URL
  (socket timeout `timeout` s), checks Keras's SHA-256 and stores it as Keras
  2 does (CIFAR-10: the archive as `cifar-10-batches-py.tar.gz`, extracted
  next to it). Nothing partial is left behind on failure.

  Raises:
    ValueError: bad arguments.
    offline.DatasetUnavailableError: not there and not downloaded (one line:
      which file to place in which directory, and why).
  """
  spec = FILES[checks.choice('dataset', dataset, DATASETS)]
  directory = resolve_cache_dir(cache_dir)
  checks.boolean('download', download)
  timeout = checks.positive_float('timeout', timeout)
  found = _find(spec, directory)
  if found:
    return found
  for rel in spec.archives:
    archive = os.path.join(directory, rel)
    if os.path.isfile(archive):
      try:
        return _extract_cifar(archive, directory)
      except Exception as e:  # pylint: disable=broad-except
        raise _unavailable(spec, directory,
                           f'cannot extract {archive}: '
                           f'{offline.short_reason(e)}') from None
  if not download:
    raise _unavailable(spec, directory, 'download disabled')
  try:
    os.makedirs(directory, exist_ok=True)
    if spec.folder:
      archive = os.path.join(directory, spec.archives[0])
      _download(spec.url, archive, spec.sha256, timeout)
      return _extract_cifar(archive, directory)
    path = os.path.join(directory, spec.filename)
    _download(spec.url, path, spec.sha256, timeout)
    return path
  except Exception as e:  # pylint: disable=broad-except
    raise _unavailable(spec, directory,
                       f'download failed: {offline.short_reason(e)}') from None


def load_arrays(dataset: str, cache_dir: Optional[str] = None, *,
                download: bool = True, timeout: float = DEFAULT_TIMEOUT):
  """`find_or_download` then `load_mnist_npz` / `load_cifar10_dir`:
  (x_train, y_train, x_test, y_test)."""
  path = find_or_download(dataset, cache_dir, download=download,
                          timeout=timeout)
  return load_mnist_npz(path) if dataset == 'mnist' else load_cifar10_dir(path)
