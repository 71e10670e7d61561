"""Federated Shakespeare through `tff.simulation.datasets.shakespeare.load_data`
on a small `shakespeare.sqlite` in TFF's format: vocabulary, fixed-length
sequences, padding masks, the char LSTM and one round of each algorithm."""

import numpy as np
import pytest
import tensorflow as tf

from perfed_tff.data import registry
from perfed_tff.data import shakespeare
from perfed_tff.models import shakespeare as models
from tests import data_fixtures as fx

L = 10
CUPID = 'THE_TAMING_OF_THE_SHREW_CUPID'


@pytest.fixture(scope='module')
def task(tmp_path_factory):
  path = tmp_path_factory.mktemp('tff_cache')
  fx.write_shakespeare(str(path))
  return registry.load_task('shakespeare', cache_dir=str(path),
                            sequence_length=L)


def _reference_ids(snippet: str) -> list[int]:
  """Independent re-statement of TFF's mapping: byte -> CHAR_VOCAB index + 1,
  else OOV (87); BOS 88 first, EOS 89 last."""
  vocab = (
      'dhlptx@DHLPTX'
      ' $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r')
  return [88] + [vocab.index(chr(b)) + 1 if chr(b) in vocab else 87
                 for b in snippet.encode('utf-8')] + [89]


def test_vocabulary():
  assert (shakespeare.PAD, shakespeare.OOV, shakespeare.BOS, shakespeare.EOS,
          shakespeare.VOCAB_SIZE) == (0, 87, 88, 89, 90)
  # 'H' is CHAR_VOCAB[8], 'a' [63], 'i' [65], 'l' [2]; ids are index + 1.
  np.testing.assert_array_equal(shakespeare.encode('Hail'), [9, 64, 66, 3])
  # 'c' [20], 'a', 'f' [42], 'é' (2 UTF-8 bytes -> 2 OOV), ' ' [13], '~' OOV.
  np.testing.assert_array_equal(shakespeare.encode('caf\u00e9 ~'),
                                [21, 64, 43, 87, 87, 14, 87])


def test_sequences_and_padding_by_hand():
  ds = tf.data.Dataset.from_tensor_slices({'snippets': [b'Hail']})
  out = list(shakespeare.build_preprocess_fn(4)(ds).as_numpy_iterator())
  # [BOS H a i l EOS] padded to 10 = 2 chunks of L + 1 = 5.
  assert len(out) == 2
  np.testing.assert_array_equal(out[0]['x'], [88, 9, 64, 66])
  np.testing.assert_array_equal(out[0]['y'], [9, 64, 66, 3])
  np.testing.assert_array_equal(out[1]['x'], [89, 0, 0, 0])
  np.testing.assert_array_equal(out[1]['y'], [0, 0, 0, 0])
  assert out[0]['x'].dtype == np.int32
  with pytest.raises(ValueError, match='`sequence_length` must be an integer >= 1'):
    shakespeare.build_preprocess_fn(0)


def test_loaded_client_matches_reference(task):
  assert task.client_ids == sorted(fx.SHAKESPEARE_CLIENTS)
  assert task.element_spec['x'] == tf.TensorSpec([None, L], tf.int32)
  assert task.element_spec['y'] == tf.TensorSpec([None, L], tf.int32)
  for data, part in ((task.train, 0), (task.test, 1)):
    for cid in task.client_ids:
      expected = []
      for s in fx.SHAKESPEARE_CLIENTS[cid][part]:
        ids = _reference_ids(s)
        ids += [0] * (-len(ids) % (L + 1))
        expected += [ids[i:i + L + 1] for i in range(0, len(ids), L + 1)]
      got = list(data.create_tf_dataset_for_client(cid).as_numpy_iterator())
      assert len(got) == len(expected)
      for e, chunk in zip(got, expected):
        np.testing.assert_array_equal(e['x'], chunk[:-1])
        np.testing.assert_array_equal(e['y'], chunk[1:])
  # 'Hail to thee, worthy Timon, and to all': 38 chars + BOS/EOS = 40 -> 4
  # chunks of 11; 'café ~' (7 bytes) + 2 = 9 -> 1 chunk: 5 sequences.
  assert len(list(task.train.create_tf_dataset_for_client(CUPID))) == 5


def test_masked_loss_accuracy_and_token_count_by_hand():
  y = np.array([[5, 7, 0]], np.int32)
  logits = np.zeros((1, 3, 90), np.float32)
  logits[0, 0, 5] = 3.0    # right
  logits[0, 1, 3] = 2.0    # wrong (target 7)
  logits[0, 2, 2] = 9.0    # padding target: ignored
  ce = [np.log(89 + np.exp(3.0)) - 3.0, np.log(88 + np.exp(2.0) + 1) - 0.0]
  loss = models.loss_fn()(tf.constant(y), tf.constant(logits))
  np.testing.assert_allclose(loss.numpy(), np.mean(ce), rtol=1e-6)
  acc = models.MaskedSparseCategoricalAccuracy()
  acc.update_state(y, logits)
  assert acc.result().numpy() == pytest.approx(0.5)
  tokens = models.NumTokens()
  tokens.update_state(y, logits)
  assert tokens.result().numpy() == 2
  all_pad = models.loss_fn()(tf.zeros((1, 3), tf.int32), tf.constant(logits))
  assert all_pad.numpy() == 0.0


def test_model_shapes_and_mask():
  model = models.create_char_lstm(90, L)
  # embedding 90*8; LSTMs 4*(256*(8+256)+256), 4*(256*(256+256)+256); dense 256*90+90.
  assert model.count_params() == 720 + 271360 + 525312 + 23130
  x = np.array([[88, 9, 64, 66, 3, 89, 0, 0, 0, 0]], np.int32)
  assert model(x).shape == (1, L, 90)
  # Padding is masked: what follows the real tokens does not change them.
  x2 = x.copy()
  x2[0, 6:] = 5
  np.testing.assert_allclose(model(x).numpy()[0, :6], model(x2).numpy()[0, :6],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('algorithm', ['per_fedavg_hf', 'fedavg'])
def test_round_end_to_end(task, algorithm):
  clients = [CUPID, 'THE_TRAGEDY_OF_KING_LEAR_KENT']
  # Loss (and for FedAvg accuracy, token count) at the initial model on each
  # client's first batch, recomputed in NumPy with the padding mask.
  model, metrics = fx.run_checked_round(task, algorithm, clients)
  losses, correct, tokens = [], 0, 0
  for b in fx.first_batches(task, algorithm, client_ids=clients):
    logits = model(b['x']).numpy()
    mask = b['y'] != 0
    losses.append(fx.softmax_cross_entropy(logits, b['y'])[mask].mean())
    correct += (logits.argmax(-1) == b['y'])[mask].sum()
    tokens += mask.sum()
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-4)
  if algorithm == 'fedavg':
    assert metrics['num_tokens'] == tokens
    assert metrics['accuracy'] == pytest.approx(correct / tokens)
