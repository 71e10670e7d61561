"""The PyTorch peer computes the project's models and rounds exactly.

Forward passes equal the Keras models on the same weights; one round of
FedAvg / Per-FedAvg FO, HF and MAML equals the project's pure-TF floor
(`experiments.benchmark_floor.PureTFFloor`, the TFF process's client loop)
on the same batches, and, for softmax regression, the independent numpy
reference.
"""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import torch_peer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FEATURES, CLASSES, BATCH = 64, 10, 4
ALPHA, BETA, DELTA, TAU = 0.05, 0.1, 1e-3, 2


def _python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        check=False)


def test_import_pulls_in_neither_torch_nor_tensorflow():
  result = _python(
      'import sys\n'
      'import experiments.torch_peer\n'
      'print(sorted(m for m in ("torch", "tensorflow") if m in sys.modules))\n')
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'


def test_unavailable_reason_when_torch_cannot_be_imported():
  result = _python(
      'import sys\n'
      'sys.modules["torch"] = None\n'
      'from experiments import torch_peer\n'
      'print(torch_peer.unavailable_reason())\n'
      'try:\n'
      '  torch_peer.TorchPeer("linear", input_shape=(3,), num_classes=2,\n'
      '                       variant=None, alpha=0.1, beta=0.1, delta=1e-3,\n'
      '                       local_steps=1, initial_weights=[])\n'
      'except ImportError as e:\n'
      '  print("ImportError:", e)\n')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith('PyTorch contenders skipped: torch is not '
                             'installed')
  assert lines[1] == 'ImportError: ' + lines[0]


def test_unavailable_reason_is_none_with_torch():
  pytest.importorskip('torch')
  assert torch_peer.unavailable_reason() is None


def test_architecture_of_tasks():
  assert torch_peer.architecture_of('emnist_cnn') == 'cnn'
  assert torch_peer.architecture_of('digits_mlp') == 'mlp'
  assert torch_peer.architecture_of('emnist_mlp') == 'mlp'
  assert torch_peer.architecture_of('synthetic') == 'linear'
  with pytest.raises(ValueError, match='shakespeare_lstm'):
    torch_peer.architecture_of('shakespeare_lstm')


def _peer(architecture, input_shape, num_classes, weights, variant=None,
          **kwargs):
  hparams = dict(alpha=ALPHA, beta=BETA, delta=DELTA, local_steps=TAU)
  hparams.update(kwargs)
  return torch_peer.TorchPeer(architecture, input_shape=input_shape,
                              num_classes=num_classes, variant=variant,
                              initial_weights=weights, **hparams)


@pytest.mark.parametrize('model', ['mlp_flat', 'mlp_image', 'cnn', 'linear'])
def test_weights_round_trip_and_forward_equal_keras(model):
  pytest.importorskip('torch')
  from perfed_tff.models import emnist  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import linear  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  if model == 'mlp_flat':
    shape, classes = (FEATURES,), CLASSES
    keras_model = mlp.create_mlp(shape, classes, seed=1)
  elif model == 'mlp_image':
    shape, classes = (6, 5, 3), 7
    keras_model = mlp.create_mlp(shape, classes, seed=1)
  elif model == 'cnn':
    shape, classes = emnist.IMAGE_SHAPE, 62
    keras_model = emnist.create_emnist_cnn(classes, seed=1)
  else:
    shape, classes = (FEATURES,), CLASSES
    keras_model = linear.create_softmax_regression(FEATURES, classes, seed=1)
  # Random biases too, so that a misplaced bias would show.
  weights = [w + rng.normal(scale=0.05, size=w.shape).astype(np.float32)
             for w in keras_model.get_weights()]
  keras_model.set_weights(weights)
  peer = _peer(model.split('_')[0], shape, classes, weights)
  back = peer.weights()
  assert [b.shape for b in back] == [w.shape for w in weights]
  for b, w in zip(back, weights):
    np.testing.assert_array_equal(b, w)
  x = rng.random((3, *shape), dtype=np.float32)
  want = keras_model(x, training=False).numpy()
  np.testing.assert_allclose(peer.logits(x), want, rtol=1e-4, atol=1e-4)


def test_wrong_weight_shapes_are_rejected():
  pytest.importorskip('torch')
  weights = [np.zeros((FEATURES, CLASSES), np.float32),
             np.zeros((CLASSES,), np.float32)]
  with pytest.raises(ValueError, match='expected 2 weight arrays'):
    _peer('linear', (FEATURES,), CLASSES, weights[:1])
  with pytest.raises(ValueError, match='shape'):
    _peer('linear', (FEATURES,), CLASSES + 1, weights)
  with pytest.raises(ValueError, match='variant'):
    _peer('linear', (FEATURES,), CLASSES, weights, variant='sgd')


def _clients(rng, k):
  """Batches of 3 clients for a variant consuming `k` batches per step: one
  with enough for tau steps and a spare batch, one that stops after 1 step
  (its data run out mid-step), one that makes no step (weight 0)."""
  counts = (TAU * k + 1, k + (k - 1), k - 1)
  out = []
  for n in counts:
    out.append([(rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
                 rng.integers(0, CLASSES, BATCH).astype(np.int32))
                for _ in range(n)])
  return out


def _dataset(batches):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batches:
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
  else:
    x = np.zeros((0, FEATURES), np.float32)
    y = np.zeros((0,), np.int32)
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x, y=y)).batch(BATCH)


@pytest.mark.parametrize('variant', [None, 'fo', 'hf', 'maml'])
def test_one_mlp_round_equals_the_tf_floor(variant):
  pytest.importorskip('torch')
  from experiments import benchmark_floor  # pylint: disable=g-import-not-at-top
  from perfed_tff import per_fedavg_step as client_work  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  k = 1 if variant is None else client_work.batches_per_step(
      client_work.Variant(variant))
  clients = _clients(np.random.default_rng(11), k)
  floor = benchmark_floor.PureTFFloor(
      mlp.mlp_model_fn((FEATURES,), CLASSES, seed=0),
      variant=None if variant is None else client_work.Variant(variant),
      alpha=ALPHA, beta=BETA, delta=DELTA, local_steps=TAU,
      clients_per_round=len(clients))
  initial = [np.asarray(w) for w in floor.weights]
  floor.set_weights(initial)
  peer = _peer('digits_mlp', (FEATURES,), CLASSES, initial, variant=variant)

  steps = peer.run_round(clients)
  floor.run_round([_dataset(b) for b in clients])

  assert steps == [TAU, 1, 0]
  got = peer.weights()
  moved = max(float(np.max(np.abs(g - w))) for g, w in zip(got, initial))
  assert moved > 1e-3   # the round did something
  for g, w in zip(got, floor.weights):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('variant', ['fo', 'hf', 'maml'])
def test_linear_client_equals_numpy_reference(variant):
  # Softmax regression (the 'synthetic' task's model) against the closed
  # forms of tests/numpy_reference.py, in float64; one client with a partial
  # last step, so the round's model is that client's.
  pytest.importorskip('torch')
  from tests import numpy_reference as ref  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  w0 = [rng.normal(scale=0.5, size=(FEATURES, CLASSES)).astype(np.float32),
        rng.normal(scale=0.5, size=(CLASSES,)).astype(np.float32)]
  x = rng.normal(size=(BATCH * 8, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, BATCH * 8).astype(np.int32)
  batches = ref.batches_of(x, y, BATCH)
  peer = _peer('synthetic', (FEATURES,), CLASSES, w0, variant=variant,
               local_steps=5, delta=1e-2)
  steps = peer.run_round([batches])
  want, want_steps, _ = ref.client_update(
      tuple(w.astype(np.float64) for w in w0),
      [(bx.astype(np.float64), by) for bx, by in batches],
      variant, ALPHA, BETA, 1e-2, 5)
  assert steps == [want_steps] == [8 // (2 if variant == 'fo' else 3)]
  for g, w in zip(peer.weights(), want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_non_finite_client_gets_weight_zero():
  pytest.importorskip('torch')
  rng = np.random.default_rng(2)
  w0 = [rng.normal(scale=0.5, size=(FEATURES, CLASSES)).astype(np.float32),
        np.zeros((CLASSES,), np.float32)]
  good = [(rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
           rng.integers(0, CLASSES, BATCH).astype(np.int32))
          for _ in range(2)]
  bad = [(np.full((BATCH, FEATURES), np.inf, np.float32), y)
         for _, y in good]
  alone = _peer('linear', (FEATURES,), CLASSES, w0, variant='fo')
  alone.run_round([good])
  mixed = _peer('linear', (FEATURES,), CLASSES, w0, variant='fo')
  assert mixed.run_round([bad, good]) == [1, 1]
  for a, b in zip(alone.weights(), mixed.weights()):
    np.testing.assert_array_equal(a, b)
  # Every client rejected: the model stays.
  stuck = _peer('linear', (FEATURES,), CLASSES, w0, variant='fo')
  stuck.run_round([bad])
  for a, b in zip(stuck.weights(), w0):
    np.testing.assert_array_equal(a, b)
