"""Small files in exactly TFF's dataset formats, for offline tests.

TFF's SQLite files are written by `perfed_tff.data.sql_files` (the schema is
described there).

EMNIST (`emnist_all.sqlite`): features `pixels` (784 floats, 28x28) and
`label` (one int64); splits digits_only_train/test, all_train/test.
Shakespeare (`shakespeare.sqlite`): feature `snippets` (one bytes value);
splits train/test.

Keras files (`mnist.npz`, `cifar-10-batches-py/`): see `write_mnist_npz` and
`write_cifar10_dir`.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import tempfile

import numpy as np

from perfed_tff.data import sql_files

write_sql_client_data = sql_files.write_sql_client_data
emnist_example = sql_files.emnist_example
shakespeare_example = sql_files.shakespeare_example


def emnist_pixels(client: int, index: int) -> np.ndarray:
  """A deterministic image: pixel (r, c) = ((r + 2c + 3 client + 5 index)
  mod 17) / 16, so tests can recompute it."""
  r, c = np.meshgrid(np.arange(28), np.arange(28), indexing='ij')
  return (((r + 2 * c + 3 * client + 5 * index) % 17) / 16.0).astype(np.float32)


def emnist_label(client: int, index: int, num_classes: int) -> int:
  return (client + 3 * index) % num_classes


def write_emnist(cache_dir: str, num_clients: int = 4, train_per_client: int = 6,
                 test_per_client: int = 2) -> str:
  """`emnist_all.sqlite` with clients f'f{k:04d}_00' in all four splits.

  Train examples of client k have indices 0..train_per_client-1, test ones
  continue from there; digits splits use labels mod 10, `all_*` mod 62.
  """
  splits = {}
  for prefix, classes in (('digits_only', 10), ('all', 62)):
    for split, lo, hi in (('train', 0, train_per_client),
                              ('test', train_per_client,
                               train_per_client + test_per_client)):
      splits[f'{prefix}_{split}'] = {
        f'f{k:04d}_00': [emnist_example(emnist_pixels(k, i),
                        emnist_label(k, i, classes))
                                 for i in range(lo, hi)]
        for k in range(num_clients)}
  os.makedirs(cache_dir, exist_ok=True)
  return write_sql_client_data(os.path.join(cache_dir, 'emnist_all.sqlite'),
                                 splits)


SHAKESPEARE_CLIENTS = {
  'THE_TRAGEDY_OF_KING_LEAR_KENT': (
    ['Hark!', 'When shall we meet again?', 'Fair is foul, and foul is fair.'],
    ['Away, away!']),
  'MUCH_ADO_ABOUT_NOTHING_EMILIA': (
    ['Never.', 'But now, my lord.', 'How if fair and foolish?'],
    ['Why, with my lord, madam.']),
  'THE_TAMING_OF_THE_SHREW_CUPID': (
    ['Hail to thee, worthy Timon, and to all', 'caf\u00e9 ~'],
    ['Is not this man jealous?']),
}


def write_shakespeare(cache_dir: str, clients=None) -> str:
  """`shakespeare.sqlite` with {client: (train snippets, test snippets)}."""
  clients = SHAKESPEARE_CLIENTS if clients is None else clients
  splits = {'train': {}, 'test': {}}
  for cid, (train, test) in clients.items():
    splits['train'][cid] = [shakespeare_example(s) for s in train]
    splits['test'][cid] = [shakespeare_example(s) for s in test]
  os.makedirs(cache_dir, exist_ok=True)
  return write_sql_client_data(os.path.join(cache_dir, 'shakespeare.sqlite'),
                                 splits)


def run_round(task, algorithm: str, *, client_ids, batch_size: int = 2,
              local_steps: int = 1, alpha: float = 0.01, beta: float = 0.01,
              seed: int = 0):
  """One round of `algorithm` on `task` for `client_ids` (must run inside a
  TFF execution context). Returns (initial trainable weights, new trainable
  weights, the round's client-work train metrics), weights as NumPy lists."""
  from perfed_tff import algorithms
  from perfed_tff.data import task as task_lib

  process = algorithms.build_algorithm(
      algorithm, task.model_fn, alpha=alpha, beta=beta, local_steps=local_steps)
  state = process.initialize()
  before = [np.array(w) for w in process.get_model_weights(state).trainable]
  num_batches = algorithms.batches_per_round(algorithm, local_steps)
  data = [task_lib.client_batches(
      task.train.create_tf_dataset_for_client(cid), batch_size=batch_size,
      num_batches=num_batches, seed=task_lib.derive_seed(seed, 0, cid),
      shuffle_buffer=task.shuffle_buffer) for cid in client_ids]
  output = process.next(state, data)
  after = [np.array(w) for w in process.get_model_weights(output.state).trainable]
  return before, after, output.metrics['client_work']['train']


def first_batches(task, algorithm: str, *, client_ids, batch_size: int = 2,
                  local_steps: int = 1, seed: int = 0):
  """The first batch each client of `run_round` consumed (same seeds; a
  fresh dataset's first iteration, as in the TFF worker), as NumPy dicts."""
  from perfed_tff import algorithms
  from perfed_tff.data import task as task_lib
  num_batches = algorithms.batches_per_round(algorithm, local_steps)
  out = []
  for cid in client_ids:
    ds = task_lib.client_batches(
        task.train.create_tf_dataset_for_client(cid), batch_size=batch_size,
        num_batches=num_batches, seed=task_lib.derive_seed(seed, 0, cid),
        shuffle_buffer=task.shuffle_buffer)
    batch = next(iter(ds))
    out.append({k: v.numpy() for k, v in batch.items()})
  return out


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """-log softmax(logits)[label], per example, in float64 NumPy."""
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(log_p, labels[..., None].astype(np.int64), -1)[..., 0]


# Keras dataset files (what `tf.keras.datasets` leaves in ~/.keras/datasets).
# Images are numbered globally (train first, then test), so a test can
# recompute every pixel and label after the loader pools train and test.

def keras_label(index: int) -> int:
  """Label of image `index`: (7 index + 3) mod 10 (every class in any 10
  consecutive images)."""
  return (7 * index + 3) % 10


def mnist_image(index: int) -> np.ndarray:
  """A deterministic 28x28 uint8 image: pixel (r, c) = (3 r + 7 c + 11 index)
  mod 256, except pixel (0, 0) = floor(index / 256) mod 256, so images
  0..65535 all differ."""
  r, c = np.meshgrid(np.arange(28), np.arange(28), indexing='ij')
  image = ((3 * r + 7 * c + 11 * index) % 256).astype(np.uint8)
  image[0, 0] = (index // 256) % 256
  return image


def write_mnist_npz(cache_dir: str, num_train: int = 200,
                    num_test: int = 100) -> str:
  """`mnist.npz` as `tf.keras.datasets.mnist` stores it: x_train (N, 28, 28)
  uint8, y_train (N,) uint8, x_test, y_test; images 0..num_train-1 for
  training, the next num_test for testing."""
  def arrays(indices):
    return (np.stack([mnist_image(i) for i in indices]),
            np.array([keras_label(i) for i in indices], np.uint8))
  x_train, y_train = arrays(range(num_train))
  x_test, y_test = arrays(range(num_train, num_train + num_test))
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, 'mnist.npz')
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=y_test)
  return path


def cifar_image(index: int) -> np.ndarray:
  """A deterministic (32, 32, 3) uint8 RGB image: pixel (r, c, channel) =
  (r + 2 c + 85 channel + 13 index) mod 256, different along rows, columns
  and channels, so a wrong reshape/transpose changes it (images 0..255 all
  differ)."""
  r, c, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3),
                         indexing='ij')
  return ((r + 2 * c + 85 * ch + 13 * index) % 256).astype(np.uint8)


def cifar_batch(indices, batch_label: bytes) -> dict:
  """One CIFAR-10 batch dict with bytes keys; b'data' rows are channel-major
  (1024 red, 1024 green, 1024 blue values), as in the real files."""
  indices = list(indices)
  return {
      b'batch_label': batch_label,
      b'labels': [keras_label(i) for i in indices],
      b'data': np.stack([cifar_image(i).transpose(2, 0, 1).reshape(-1)
                         for i in indices]).astype(np.uint8),
      b'filenames': [f'image_{i:05d}.png'.encode() for i in indices],
  }


def write_cifar10_dir(cache_dir: str, per_batch: int = 12,
                      num_test: int = 20) -> str:
  """`<cache_dir>/cifar-10-batches-py/` with data_batch_1..5 (per_batch
  images each, images 0..5 per_batch-1), test_batch (the next num_test) and
  batches.meta, pickled (protocol 2) like the real files. Returns the folder."""
  folder = os.path.join(cache_dir, 'cifar-10-batches-py')
  os.makedirs(folder, exist_ok=True)
  batches = {f'data_batch_{b}': cifar_batch(
      range((b - 1) * per_batch, b * per_batch),
      f'training batch {b} of 5'.encode()) for b in range(1, 6)}
  batches['test_batch'] = cifar_batch(
      range(5 * per_batch, 5 * per_batch + num_test),
      b'testing batch 1 of 1')
  batches['batches.meta'] = {
      b'num_cases_per_batch': per_batch, b'num_vis': 3072,
      b'label_names': [b'airplane', b'automobile', b'bird', b'cat', b'deer',
                       b'dog', b'frog', b'horse', b'ship', b'truck']}
  for name, batch in batches.items():
    with open(os.path.join(folder, name), 'wb') as f:
      pickle.dump(batch, f, protocol=2)
  return folder


def write_cifar10_archive(path: str, per_batch: int = 12,
                          num_test: int = 20) -> str:
  """`cifar-10-python.tar.gz`-style archive (a top-level
  `cifar-10-batches-py/` folder) at `path`."""
  with tempfile.TemporaryDirectory() as scratch:
    folder = write_cifar10_dir(scratch, per_batch, num_test)
    with tarfile.open(path, 'w:gz') as tar:
      tar.add(folder, arcname='cifar-10-batches-py')
  return path


def run_checked_round(task, algorithm, client_ids):
  """One round on two clients: checks the examples consumed (2 batches of 2
  per client for FedAvg, 6 for HF) and that the weights moved and stayed
  finite; returns (Keras model at the initial weights, round metrics)."""
  before, after, metrics = run_round(task, algorithm, client_ids=client_ids)
  assert metrics['num_examples'] == (12 if algorithm == 'per_fedavg_hf' else 4)
  assert all(np.isfinite(w).all() for w in after)
  assert any(not np.allclose(a, b) for a, b in zip(after, before))
  model = task.keras_model_fn()
  for w, v in zip(model.trainable_weights, before):  # Same layout, same init.
    np.testing.assert_allclose(w.numpy(), v, atol=1e-6)
    w.assign(v)
  return model, metrics


class LoggingClientData:
  """A ClientData stand-in that appends `(name, client id)` to `log` for
  every dataset it creates (which split, and which user, a reader touched)."""

  def __init__(self, client_data, log, name):
    self._cd = client_data
    self._log = log
    self._name = name

  @property
  def client_ids(self):
    return self._cd.client_ids

  @property
  def element_type_structure(self):
    return self._cd.element_type_structure

  def create_tf_dataset_for_client(self, cid):
    self._log.append((self._name, cid))
    return self._cd.create_tf_dataset_for_client(cid)
