"""Writes client data in TFF's SQLite format (`tff.simulation.datasets`).

TFF's `SqlClientData` schema (`sql_client_data.py`): table
`examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)`
with one serialized `tf.train.Example` per row, and
`client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)`.
`tff.simulation.datasets.save_to_sql_client_data` writes the same schema but
one split per file; TFF's real files (`emnist_all.sqlite`,
`shakespeare.sqlite`) hold every client in several splits of one file, so
the rows are written here directly. TFF's `load_data(cache_dir=DIR)` reads
such a file offline when it is at `DIR/<its file name>`.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable, Mapping

import tensorflow as tf

_SCHEMA = (
    'CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL,'
    ' serialized_example_proto BLOB NOT NULL);',
    'CREATE TABLE client_metadata (client_id TEXT NOT NULL, '
    'split_name TEXT NOT NULL, num_examples INTEGER NOT NULL);',
)
# TFF reads a client's examples with `SELECT ... FROM examples WHERE
# client_id = '...' and split_name = '...'`: without an index every such
# read scans the whole table, so a round's cost grows with the population
# (0.1 s per client on a 3,383-client EMNIST-sized file, 0.1 ms with it).
INDEX = ('CREATE INDEX IF NOT EXISTS examples_by_client ON examples '
         '(client_id, split_name);')


def write_sql_client_data(
    path: str, splits: Mapping[str, Mapping[str, Iterable[bytes]]]) -> str:
  """Writes `splits` ({split: {client_id: [serialized tf.train.Example]}}) to
  a new SQLite file at `path` (an existing file is replaced) and returns
  `path`. The file is written under a temporary name and renamed, so `path`
  never holds a partial file. The examples are indexed by client (`INDEX`),
  so reading one client does not scan the file. A client listed with no examples gets a
  metadata row with 0 examples (as clients with an empty split do)."""
  tmp = f'{path}.partial'
  if os.path.exists(tmp):
    os.remove(tmp)
  con = sqlite3.connect(tmp)
  try:
    with con:
      for q in _SCHEMA:
        con.execute(q)
      for split, clients in splits.items():
        for cid, protos in clients.items():
          protos = list(protos)
          con.executemany(
              'INSERT INTO examples (split_name, client_id, '
              'serialized_example_proto) VALUES (?, ?, ?);',
              [(split, cid, p) for p in protos])
          con.execute(
              'INSERT INTO client_metadata (client_id, split_name, '
              'num_examples) VALUES (?, ?, ?);', (cid, split, len(protos)))
      con.execute(INDEX)
  finally:
    con.close()
  os.replace(tmp, path)
  return path


def emnist_example(pixels, label: int) -> bytes:
  """One EMNIST `tf.train.Example`: `pixels` (784 floats of a 28x28 image)
  and `label` (one int64), as in TFF's `emnist_all.sqlite`."""
  values = tf.reshape(tf.convert_to_tensor(pixels, tf.float32), [-1]).numpy()
  if values.size != 784:
    raise ValueError(f'pixels must be 28x28, got {values.size} values')
  return tf.train.Example(features=tf.train.Features(feature={
      'pixels': tf.train.Feature(float_list=tf.train.FloatList(value=values)),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


def shakespeare_example(snippet) -> bytes:
  """One Shakespeare `tf.train.Example`: `snippets` (one bytes value), as in
  TFF's `shakespeare.sqlite`."""
  data = snippet.encode('utf-8') if isinstance(snippet, str) else snippet
  return tf.train.Example(features=tf.train.Features(feature={
      'snippets': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
  })).SerializeToString()
