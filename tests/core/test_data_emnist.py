"""Federated EMNIST through `tff.simulation.datasets.emnist.load_data`, on a
small `emnist_all.sqlite` written in TFF's format into a temporary cache_dir."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_federated.python.simulation.datasets import sql_client_data

from perfed_tff.data import registry
from perfed_tff.models import emnist as emnist_models
from perfed_tff.models import mlp
from tests import data_fixtures as fx

IDS = ['f0000_00', 'f0001_00', 'f0002_00', 'f0003_00']


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tff_cache')
  fx.write_emnist(str(path), num_clients=4, train_per_client=6,
                  test_per_client=2)
  return str(path)


@pytest.mark.parametrize('name,classes', [('emnist', 10), ('emnist62', 62)])
def test_examples_match_the_file(cache_dir, name, classes):
  task = registry.load_task(name, cache_dir=cache_dir)
  assert task.client_ids == IDS and task.test.client_ids == IDS
  assert task.unseen is None
  for data, indices in ((task.train, range(0, 6)), (task.test, range(6, 8))):
    for k in (0, 3):
      ex = list(data.create_tf_dataset_for_client(IDS[k]).as_numpy_iterator())
      assert len(ex) == len(indices)
      for e, i in zip(ex, indices):
        assert e['x'].dtype == np.float32 and e['x'].shape == (28, 28, 1)
        assert e['y'].dtype == np.int32 and e['y'].shape == ()
        np.testing.assert_array_equal(e['x'][..., 0], fx.emnist_pixels(k, i))
        assert e['y'] == (k + 3 * i) % classes
  # Client 3, example 6: label (3 + 18) = 21 -> 1 among digits, 21 in EMNIST-62.
  y = [e['y'] for e in task.test.create_tf_dataset_for_client(IDS[3])]
  assert int(y[0]) == {10: 1, 62: 21}[classes]
  spec = task.element_spec
  assert spec['x'] == tf.TensorSpec([None, 28, 28, 1], tf.float32)
  assert spec['y'] == tf.TensorSpec([None], tf.int32)


def test_unseen_clients(cache_dir):
  task = registry.load_task('emnist', cache_dir=cache_dir, seed=7,
                            num_unseen_users=1)
  train_ids, test_ids = task.unseen[0].client_ids, task.unseen[1].client_ids
  assert len(train_ids) == 1 and train_ids == test_ids
  assert sorted(task.client_ids + train_ids) == IDS
  assert not set(train_ids) & set(task.client_ids)
  with pytest.raises(ValueError, match='not a client'):
    task.train.create_tf_dataset_for_client(train_ids[0])
  k = IDS.index(train_ids[0])
  e = next(iter(task.unseen[1].create_tf_dataset_for_client(train_ids[0])))
  np.testing.assert_array_equal(e['x'][..., 0], fx.emnist_pixels(k, 6))
  again = registry.load_task('emnist', cache_dir=cache_dir, seed=7,
                             num_unseen_users=1)
  assert again.unseen[0].client_ids == train_ids
  half = registry.load_task('emnist62', cache_dir=cache_dir, unseen_fraction=0.5)
  assert len(half.client_ids) == 2 and len(half.unseen[0].client_ids) == 2
  with pytest.raises(ValueError, match='at most one of'):
    registry.load_task('emnist', cache_dir=cache_dir, num_unseen_users=1,
                       unseen_fraction=0.5)
  with pytest.raises(ValueError, match=r'must be in \[0, 4\)'):
    registry.load_task('emnist', cache_dir=cache_dir, num_unseen_users=4)


def test_models():
  # conv 3*3*32+32, conv 3*3*32*64+64, dense 12*12*64*128+128, dense 128*K+K.
  assert emnist_models.create_emnist_cnn(10).count_params() == 1199882
  assert emnist_models.create_emnist_cnn(62).count_params() == 1206590
  # The paper's MLP on 784 pixels: 784*80+80 + 80*60+60 + 60*10+10.
  assert mlp.create_mlp((28, 28, 1), 10).count_params() == 68270
  with pytest.raises(ValueError, match='`num_classes` must be 10'):
    emnist_models.create_emnist_cnn(26)
  with pytest.raises(ValueError, match="`model` must be one of"):
    registry.load_task('emnist', model='resnet')


def test_clients_are_created_lazily(tmp_path, monkeypatch):
  """Loading creates a fixed handful of SQL datasets, whatever the population."""
  created = []
  original = sql_client_data.SqlClientData._create_dataset

  def counting(self, client_id):
    created.append(client_id)
    return original(self, client_id)

  monkeypatch.setattr(sql_client_data.SqlClientData, '_create_dataset', counting)
  counts = {}
  for population in (4, 3400):
    cache = tmp_path / str(population)
    cache.mkdir()
    blob = fx.emnist_example(fx.emnist_pixels(0, 0), 0)
    ids = [f'f{k:04d}_00' for k in range(population)]
    fx.write_sql_client_data(str(cache / 'emnist_all.sqlite'), {
        s: {cid: [blob] for cid in ids}
        for s in ('digits_only_train', 'digits_only_test', 'all_train',
                  'all_test')})
    created.clear()
    task = registry.load_task('emnist', cache_dir=str(cache),
                              num_unseen_users=population // 4)
    counts[population] = len(created)
    assert len(task.client_ids) == population - population // 4
  assert counts[3400] == counts[4] <= 6
  created.clear()
  next(iter(task.train.create_tf_dataset_for_client(task.client_ids[-1])))
  assert created == [task.client_ids[-1]]


@pytest.mark.parametrize('name', ['emnist', 'emnist62'])
@pytest.mark.parametrize('algorithm', ['per_fedavg_hf', 'fedavg'])
def test_round_end_to_end(cache_dir, name, algorithm):
  task = registry.load_task(name, cache_dir=cache_dir)
  before, after, metrics = fx.run_round(task, algorithm,
                                        client_ids=task.client_ids[:2])
  assert [w.shape for w in before][-2:] == [(128, 10 if name == 'emnist' else 62),
                                            (10 if name == 'emnist' else 62,)]
  assert metrics['num_examples'] == (12 if algorithm == 'per_fedavg_hf' else 4)
  assert np.isfinite(metrics['loss'])
  assert all(np.isfinite(w).all() for w in after)
  assert any(not np.allclose(a, b) for a, b in zip(after, before))
