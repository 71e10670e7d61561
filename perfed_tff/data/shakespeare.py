"""Federated Shakespeare through TFF's own loader: next-character prediction.

`tff.simulation.datasets.shakespeare.load_data(cache_dir)` reads
`<cache_dir>/shakespeare.sqlite` (splits `train`/`test`; one client per
speaking role; examples `snippets`, a byte string).

Vocabulary (TFF's `char_prediction_preprocessing`): the 86 characters of
`CHAR_VOCAB` get ids 1..86 in that order; pad = 0, OOV = 87 (any other byte),
BOS = 88, EOS = 89; `VOCAB_SIZE` = 90. A snippet s_1..s_n becomes
[BOS, id(s_1), ..., id(s_n), EOS], right-padded with 0 to a multiple of L + 1
and cut into chunks c of length L + 1 (L = `sequence_length`, default 80);
each chunk is one example x = c[:-1], y = c[1:] (int32 [L]). Accuracy and loss
ignore positions whose target y is padding.

Mapping is done per client, lazily, by `ClientData.preprocess` on top of TFF's
SQL-backed `ClientData`.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.data import offline
from perfed_tff.data import task as task_lib
from perfed_tff.data import unseen as unseen_lib
from perfed_tff.models import shakespeare as shakespeare_models

FILENAME = 'shakespeare.sqlite'
DEFAULT_SEQUENCE_LENGTH = 80
CHAR_VOCAB = list(
    'dhlptx@DHLPTX'
    ' $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'
)
PAD = 0
OOV = len(CHAR_VOCAB) + 1
BOS = len(CHAR_VOCAB) + 2
EOS = len(CHAR_VOCAB) + 3
VOCAB_SIZE = len(CHAR_VOCAB) + 4


def _byte_table() -> np.ndarray:
  """id of every byte value 0..255 (OOV unless in CHAR_VOCAB)."""
  table = np.full(256, OOV, np.int32)
  for i, ch in enumerate(CHAR_VOCAB):
    table[ord(ch)] = i + 1
  return table


def encode(snippet) -> np.ndarray:
  """Token ids of one snippet (bytes or str, no BOS/EOS), in NumPy."""
  data = snippet.encode('utf-8') if isinstance(snippet, str) else bytes(snippet)
  return _byte_table()[np.frombuffer(data, np.uint8)]


def build_preprocess_fn(sequence_length: int = DEFAULT_SEQUENCE_LENGTH):
  """dataset of {'snippets': string} -> dataset of OrderedDict(x, y) int32 [L]."""
  split = checks.integer('sequence_length', sequence_length, 1) + 1

  def to_tokens(example):
    # A constant byte -> id table (no lookup-table resource, so the dataset
    # serializes into TFF computations).
    table = tf.constant(_byte_table())
    raw = tf.io.decode_raw(example['snippets'], tf.uint8)
    tokens = tf.gather(table, tf.cast(raw, tf.int32))
    tokens = tf.concat([[BOS], tokens, [EOS]], 0)
    pad = (-tf.shape(tokens)[0]) % split
    return tf.concat([tokens, tf.zeros([pad], tf.int32)], 0)

  def to_xy(chunk):
    return collections.OrderedDict(x=chunk[:-1], y=chunk[1:])

  def preprocess(dataset):
    return (dataset.map(to_tokens)
            .unbatch()
            .batch(split, drop_remainder=True)
            .map(to_xy))

  return preprocess


def load_shakespeare(*, cache_dir: Optional[str] = None, seed: int = 0,
                     sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
                     num_unseen_users: Optional[int] = None,
                     unseen_fraction: Optional[float] = None,
                     lstm_units: int = shakespeare_models.LSTM_UNITS,
                     download: bool = True,
                     download_timeout: float = offline.DEFAULT_DOWNLOAD_TIMEOUT
                     ) -> task_lib.FederatedTask:
  """Shakespeare next-character prediction as a `FederatedTask` with the
  two-layer char LSTM (masked loss and accuracy).

  Args:
    cache_dir: directory holding `shakespeare.sqlite` (`None`: `~/.tff`).
    seed: seeds the choice of unseen clients and the model initialization.
    sequence_length: L, tokens per example (TFF's default 80).
    num_unseen_users / unseen_fraction: roles held out of training.
    lstm_units: units of each LSTM layer (256 in McMahan et al.).
    download: whether TFF may try to download a missing file.
    download_timeout: socket timeout (s) for that download.

  Raises:
    offline.DatasetUnavailableError: the file is missing and not downloaded.
  """
  preprocess = build_preprocess_fn(sequence_length)
  unseen_lib.check_unseen_options(num_unseen_users, unseen_fraction)  # Before reading.
  train, test = offline.load_tff_file(
      'Shakespeare', FILENAME,
      lambda d: tff.simulation.datasets.shakespeare.load_data(cache_dir=d),
      cache_dir, download=download, download_timeout=download_timeout)
  train, test, unseen = unseen_lib.populations(
      train, test, preprocess, seed=seed, num_unseen_users=num_unseen_users,
      unseen_fraction=unseen_fraction, dataset='Shakespeare',
      path=os.path.join(offline.resolve_cache_dir(cache_dir), FILENAME))
  return task_lib.FederatedTask(
      name='shakespeare',
      train=train, test=test, unseen=unseen,
      model_fn=shakespeare_models.char_lstm_model_fn(
          VOCAB_SIZE, sequence_length, pad_id=PAD, lstm_units=lstm_units,
          seed=seed),
      keras_model_fn=lambda: shakespeare_models.create_char_lstm(
          VOCAB_SIZE, sequence_length, lstm_units=lstm_units, seed=seed),
      loss_fn=lambda: shakespeare_models.loss_fn(PAD),
      element_spec=shakespeare_models.element_spec(sequence_length),
      shuffle_buffer=100,
      ignore_label=PAD,
      metrics_fn=lambda: [shakespeare_models.MaskedSparseCategoricalAccuracy(
          PAD), shakespeare_models.NumTokens(PAD)])
