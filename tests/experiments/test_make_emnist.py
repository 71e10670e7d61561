"""`experiments/make_emnist.py`: an EMNIST-sized population of MNIST images in
TFF's `emnist_all.sqlite` format, read back by TFF's own loader."""

import collections
import os
import re
import sqlite3

import numpy as np
import pytest

from experiments import make_emnist
from perfed_tff import checks
from perfed_tff.program import metrics as metrics_lib
from tests import binary_helpers as h
from tests import data_fixtures

NUM_TRAIN, NUM_TEST = 200, 100  # The small npz: images 0..299.
PROGRAM = 'make_emnist.py'


def _run(*flags, timeout=180):
  return h.run(*flags, timeout=timeout, module='experiments.make_emnist')


@pytest.fixture(scope='module')
def small_npz(tmp_path_factory):
  return data_fixtures.write_mnist_npz(
      str(tmp_path_factory.mktemp('mnist')), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope='module')
def built(small_npz, tmp_path_factory):
  """The binary run on the small npz: (cache_dir, its stdout)."""
  out = str(tmp_path_factory.mktemp('emnist'))
  r = _run(f'--mnist={small_npz}', f'--cache_dir={out}', '--num_clients=40',
           '--seed=3')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  return out, r.stdout


def _index_of_image():
  """uint8 image bytes -> its index in the small npz (they all differ)."""
  return {data_fixtures.mnist_image(i).tobytes(): i
          for i in range(NUM_TRAIN + NUM_TEST)}


def _read(client_data, cid):
  return [(e['pixels'].numpy(), int(e['label'].numpy()))
          for e in client_data.create_tf_dataset_for_client(cid)]


def test_tff_reads_the_population_with_every_image_once(built):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  cache_dir, stdout = built
  train, test = tff.simulation.datasets.emnist.load_data(
      only_digits=True, cache_dir=cache_dir)
  ids = list(train.client_ids)
  assert len(ids) == 40 and len(set(ids)) == 40
  assert all(re.fullmatch(r'f\d{4}_\d{2}', c) for c in ids), ids
  assert set(test.client_ids) <= set(ids)
  index = _index_of_image()
  seen = collections.Counter()
  sizes = {}
  for cid in ids:
    in_test = cid in test.client_ids
    parts = (_read(train, cid), _read(test, cid) if in_test else [])
    sizes[cid] = (len(parts[0]), len(parts[1]), in_test)
    for pixels, label in parts[0] + parts[1]:
      assert pixels.dtype == np.float32 and pixels.shape == (28, 28)
      assert 0.0 <= pixels.min() and pixels.max() <= 1.0
      image = np.rint((1.0 - pixels.astype(np.float64)) * 255).astype(np.uint8)
      i = index[image.tobytes()]
      seen[i] += 1
      # TFF's EMNIST pixels: 1 - x/255 (1.0 = background, MNIST's 0).
      np.testing.assert_array_equal(
          pixels, (1.0 - data_fixtures.mnist_image(i) / 255.0
                   ).astype(np.float32))
      assert label == data_fixtures.keras_label(i)
  assert sorted(seen) == list(range(NUM_TRAIN + NUM_TEST))
  assert set(seen.values()) == {1}
  n_train = sum(s[0] for s in sizes.values())
  n_test = sum(s[1] for s in sizes.values())
  assert n_train + n_test == NUM_TRAIN + NUM_TEST
  assert 0.05 < n_test / (n_train + n_test) < 0.2  # about 90/10
  assert min(s[0] for s in sizes.values()) >= 1
  assert len({s[0] for s in sizes.values()}) > 5  # uneven
  # Empty test splits: some listed with 0 examples, some not there at all.
  listed_empty = [c for c, s in sizes.items() if s[2] and s[1] == 0]
  absent = [c for c, s in sizes.items() if not s[2]]
  assert listed_empty and absent
  # The file is the documented function of (images, clients, seed).
  population = make_emnist.build_population(
      NUM_TRAIN + NUM_TEST, num_clients=40, seed=3)
  assert population.client_ids == ids
  assert [s[:2] for s in sizes.values()] == list(
      zip(population.train_sizes, population.test_sizes))
  # The summary line says the same.
  empty = len(listed_empty) + len(absent)
  assert stdout.count('\n') == 1
  assert (f'40 clients, {n_train} train / {n_test} test examples, {empty} '
          f'clients with an empty test split ({len(listed_empty)} listed with '
          f'0 examples, {len(absent)} not in it), train examples per client '
          f'min {min(s[0] for s in sizes.values())}') in stdout, stdout


def test_all_splits_and_the_project_loader(built):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
  cache_dir, _ = built
  digits = tff.simulation.datasets.emnist.load_data(
      only_digits=True, cache_dir=cache_dir)
  everything = tff.simulation.datasets.emnist.load_data(
      only_digits=False, cache_dir=cache_dir)
  for a, b in zip(digits, everything):
    assert list(a.client_ids) == list(b.client_ids)
    cid = a.client_ids[0]
    assert [l for _, l in _read(a, cid)] == [l for _, l in _read(b, cid)]
  # perfed_tff's EMNIST: the writers in both splits, an empty test split
  # included.
  task = registry.load_task('emnist', cache_dir=cache_dir, model='mlp')
  train, test = digits
  assert sorted(task.test.client_ids) == sorted(test.client_ids)
  assert any(len(_read(test, c)) == 0 for c in task.test.client_ids)


def test_population_scheme():
  a = make_emnist.build_population(70000, num_clients=3383, seed=0)
  b = make_emnist.build_population(70000, num_clients=3383, seed=0)
  c = make_emnist.build_population(70000, num_clients=3383, seed=1)
  assert a.client_ids == b.client_ids
  assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
  assert not np.array_equal(a.train_sizes, c.train_sizes)
  used = np.concatenate(a.train + a.test)
  np.testing.assert_array_equal(np.sort(used), np.arange(70000))
  train, test = a.train_sizes, a.test_sizes
  assert train.min() == 1 and (train <= 2).sum() >= 10
  assert ((train <= 2) & (test > 0)).any()  # one-example clients measured
  assert 0.095 < test.sum() / 70000 < 0.105
  empty = test == 0
  assert 0 < (empty & a.listed_empty).sum() and (empty & ~a.listed_empty).any()
  assert not (a.listed_empty & ~empty).any()
  with pytest.raises(ValueError):
    make_emnist.build_population(10, num_clients=11, seed=0)


def _listing(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else None


@pytest.mark.parametrize('case', ['missing_npz', 'corrupt_npz', 'arrays',
                                  'too_many_clients', 'exists', 'not_a_dir'])
def test_bad_input_in_process_writes_nothing(tmp_path, small_npz, case):
  out = tmp_path / 'out'
  mnist = small_npz
  kwargs = {}
  expected = {'missing_npz': '--mnist: ', 'corrupt_npz': '--mnist: cannot '
              'read', 'arrays': '--mnist: cannot read',
              'too_many_clients': '--num_clients: must be between 1 and the '
              'number of images (300), got 301', 'exists': '--cache_dir: ',
              'not_a_dir': '--cache_dir: '}[case]
  if case == 'missing_npz':
    mnist = str(tmp_path / 'nope.npz')
  elif case == 'corrupt_npz':
    mnist = str(tmp_path / 'mnist.npz')
    (tmp_path / 'mnist.npz').write_bytes(b'PK\x03\x04 not really a zip')
  elif case == 'arrays':
    mnist = str(tmp_path / 'mnist.npz')
    np.savez(mnist, x_train=np.zeros((3, 28, 28), np.uint8))
  elif case == 'too_many_clients':
    kwargs['num_clients'] = 301
  elif case == 'exists':
    out.mkdir()
    (out / make_emnist.FILENAME).write_bytes(b'TFF real file')
  elif case == 'not_a_dir':
    out.write_text('a file')
  before = _listing(out)
  with pytest.raises(checks.ArgumentError) as e:
    make_emnist.make(mnist, str(out), **kwargs)
  assert e.value.flag_message.startswith(expected), e.value.flag_message
  assert _listing(out) == before
  if case == 'exists':
    assert (out / make_emnist.FILENAME).read_bytes() == b'TFF real file'


def test_overwrite_replaces_the_file(tmp_path, small_npz):
  out = tmp_path / 'out'
  out.mkdir()
  (out / make_emnist.FILENAME).write_bytes(b'old')
  line = make_emnist.make(small_npz, str(out), num_clients=7, overwrite=True)
  assert '7 clients' in line
  with sqlite3.connect(out / make_emnist.FILENAME) as con:
    assert con.execute('SELECT COUNT(*) FROM examples').fetchone()[0] == 600
  assert os.listdir(out) == [make_emnist.FILENAME]


@pytest.mark.parametrize('flags,expected', [
    (('--mnist={tmp}/nope.npz',), f'{PROGRAM}: error: --mnist: '),
    (('--num_clients=0',), f'{PROGRAM}: error: flag --num_clients=0: '),
    (('--num_clients=301',), f'{PROGRAM}: error: --num_clients: must be '
     'between 1 and the number of images (300), got 301'),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, small_npz, flags,
                                         expected):
  out = tmp_path / 'out'
  flags = [f.format(tmp=tmp_path) for f in flags]
  if not any(f.startswith('--mnist') for f in flags):
    flags.append(f'--mnist={small_npz}')
  r = _run(f'--cache_dir={out}', *flags)
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  line = h.assert_one_error_line(r.stderr, PROGRAM)
  assert line.startswith(expected), line
  assert not out.exists() and r.stdout == ''


@pytest.mark.slow
def test_real_mnist_at_full_size(shared_data, tmp_path):
  """The real file: 3,383 clients, all 70,000 images, read by TFF."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from perfed_tff.data import keras_files  # pylint: disable=g-import-not-at-top
  mnist = os.path.join(shared_data, 'mnist.npz')
  line = make_emnist.make(mnist, str(tmp_path))
  print(line)
  assert '3383 clients' in line
  path = tmp_path / make_emnist.FILENAME
  with sqlite3.connect(path) as con:
    rows = dict(((s, (n, e)) for s, n, e in con.execute(
        'SELECT split_name, COUNT(DISTINCT client_id), SUM(num_examples) '
        'FROM client_metadata GROUP BY split_name')))
    assert con.execute('SELECT COUNT(*) FROM examples').fetchone()[0] == (
        2 * 70000)
  for prefix in ('digits_only', 'all'):
    assert rows[f'{prefix}_train'][0] == 3383
    assert rows[f'{prefix}_train'][1] + rows[f'{prefix}_test'][1] == 70000
    assert rows[f'{prefix}_test'][0] < 3383  # some not in the test split
  train, test = tff.simulation.datasets.emnist.load_data(
      only_digits=True, cache_dir=str(tmp_path))
  assert len(train.client_ids) == 3383
  # A few clients against the npz and the documented scheme.
  x_train, y_train, x_test, y_test = keras_files.load_mnist_npz(mnist)
  images = np.concatenate([x_train, x_test])
  labels = np.concatenate([y_train, y_test])
  population = make_emnist.build_population(70000, num_clients=3383, seed=0)
  assert population.client_ids == list(train.client_ids)
  for i in (0, 1, 1234, 3382):
    cid = population.client_ids[i]
    got = _read(train, cid)
    idx = population.train[i]
    assert [l for _, l in got] == labels[idx].tolist()
    np.testing.assert_array_equal(np.stack([p for p, _ in got]),
                                  make_emnist.emnist_pixels(images[idx]))


@pytest.mark.slow
def test_train_and_evaluate_the_cnn_on_real_mnist_writers(shared_data,
                                                          tmp_path):
  """The EMNIST-sized run's path at a tiny budget: a population of real
  MNIST writers in TFF's format (clients with an empty test split among
  them), Per-FedAvg HF with TFF's EMNIST CNN, personalized evaluation of
  clients that include empty-test ones: no crash, and they are counted."""
  cache = tmp_path / 'tff'
  make_emnist.make(os.path.join(shared_data, 'mnist.npz'), str(cache),
                   num_clients=60, num_images=1200, seed=3)
  out = tmp_path / 'out'
  r = h.run('--algorithm=per_fedavg_hf', '--dataset=emnist',
            f'--cache_dir={cache}', '--rounds=1', '--clients_per_round=3',
            '--local_steps=1', '--batch_size=4', '--eval_every=1',
            '--eval_clients=0', f'--root_output_dir={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  rows = metrics_lib.read_csv(
      str(out / 'per_fedavg_hf' / 'metrics' / 'eval.csv'))
  last = rows[-1]
  assert last['seen/num_clients_empty'] > 0, last
  assert last['seen/num_clients'] + last['seen/num_clients_empty'] <= 60
  assert 0.0 <= last['seen/step_1/accuracy_mean'] <= 1.0
