"""Small files in exactly TFF's dataset formats, for offline tests.

TFF's `SqlClientData` schema (`sql_client_data.py`): table
`examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)` with
one serialized `tf.train.Example` per row, and
`client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)`.
`tff.simulation.datasets.save_to_sql_client_data` writes the same schema but
puts each client in a single split; TFF's real files hold every client in both
a train and a test split, so the rows are written here directly.

EMNIST (`emnist_all.sqlite`): features `pixels` (784 floats, 28x28) and
`label` (one int64); splits digits_only_train/test, all_train/test.
Shakespeare (`shakespeare.sqlite`): feature `snippets` (one bytes value);
splits train/test.
"""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import tensorflow as tf

_SCHEMA = (
  'CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, '
  'serialized_example_proto BLOB NOT NULL);',
  'CREATE TABLE client_metadata (client_id TEXT NOT NULL, '
  'split_name TEXT NOT NULL, num_examples INTEGER NOT NULL);',
)


def write_sql_client_data(path: str, splits: dict) -> str:
  """splits: {split_name: {client_id: [serialized tf.train.Example bytes]}}."""
  if os.path.exists(path):
    os.remove(path)
  with sqlite3.connect(path) as con:
    for q in _SCHEMA:
      con.execute(q)
    for split, clients in splits.items():
      for cid, protos in clients.items():
        con.executemany(
          'INSERT INTO examples (split_name, client_id, '
          'serialized_example_proto) VALUES (?, ?, ?);',
          [(split, cid, p) for p in protos])
        con.execute(
          'INSERT INTO client_metadata (client_id, split_name, '
          'num_examples) VALUES (?, ?, ?);', (cid, split, len(protos)))
  con.close()
  return path


def emnist_example(pixels: np.ndarray, label: int) -> bytes:
  pixels = np.asarray(pixels, np.float32)
  assert pixels.shape == (28, 28)
  return tf.train.Example(features=tf.train.Features(feature={
    'pixels': tf.train.Feature(
      float_list=tf.train.FloatList(value=pixels.flatten())),
    'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


def shakespeare_example(snippet) -> bytes:
  data = snippet.encode('utf-8') if isinstance(snippet, str) else snippet
  return tf.train.Example(features=tf.train.Features(feature={
    'snippets': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
  })).SerializeToString()


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
