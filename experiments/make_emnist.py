r"""Builds an EMNIST-sized federated population of real MNIST images, in the
format of TFF's `emnist_all.sqlite`.

  python -m experiments.make_emnist --mnist=PATH/mnist.npz --cache_dir=DIR \
      [--num_clients=3383] [--num_images=0] [--seed=0] [--overwrite]

writes DIR/emnist_all.sqlite, which
`tff.simulation.datasets.emnist.load_data(only_digits=True, cache_dir=DIR)`
reads offline (and so `python -m experiments.train --dataset=emnist
--cache_dir=DIR`). Splits `digits_only_train` / `digits_only_test`, and
`all_train` / `all_test` with the same examples, so `only_digits=False`
reads it too. Examples as in TFF's EMNIST: `pixels` float32 [28, 28] in
[0, 1] with 1.0 the background (float32(1 - x / 255) of MNIST's uint8 x, in
which 0 is the background) and `label` int in 0..9.

The scheme, a pure function of the npz, --num_clients (N) and --seed:

1. Pool. MNIST's 60,000 train and 10,000 test images (70,000) are pooled (the
   first --num_images of them when given) and shuffled.
2. Client sizes. Client i gets n_i = 1 + m_i images, where (m_1, ..., m_N) ~
   Multinomial(70,000 - N, w / sum(w)) and w_i ~ LogNormal(0, 0.7): every
   client has at least one image, the sizes sum to 70,000 and are uneven
   (N = 3,383, TFF's EMNIST-10 writer count: mean 20.7, median about 16,
   a long tail to about 200, and a few clients of 1-3 images).
3. Train/test, about 90/10 like EMNIST's writers. t_i = floor(0.1 n_i + u_i)
   with u_i ~ U[0, 1) (stochastic rounding: 10% of the examples in
   expectation), at most n_i - 1, so every client keeps a train example;
   its first n_i - t_i images are its train split, the rest its test split.
   So the awkward clients of a real population appear: clients with 1 or 2
   train examples, and clients without a test example (about 8% of them for
   N = 3,383: small clients round to t_i = 0).
4. Empty test splits. Of the clients with t_i = 0, a seeded half are listed
   in the test split with no example (a `client_metadata` row with 0
   examples, as TFF lists a client with an empty split); the others are not
   in the test split at all (perfed_tff's EMNIST loader keeps the writers
   present in both splits, so these leave its population).
5. Ids in TFF's writer style, f'f{i:04d}_{k:02d}' for client i = 0..N-1 with
   a seeded two-digit k.

Prints one summary line: clients, train / test examples, clients with an
empty test split, min / median / max train examples per client. An existing
DIR/emnist_all.sqlite is replaced only with --overwrite (TFF's real file
may be there). Bad input (a missing or malformed npz, a bad flag) prints one
line `make_emnist.py: error: ...` and exits with status 2, having written
nothing; the file is written under a temporary name and renamed, so an
interrupted run never leaves a partial emnist_all.sqlite.
"""

from __future__ import annotations

import dataclasses
import os
import time

if __name__ == '__main__':  # Not when imported (tests, notebooks).
  from experiments import startup  # pylint: disable=g-import-not-at-top
  startup.begin()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from experiments import cli
from perfed_tff import checks
from perfed_tff.program import interrupts

FILENAME = 'emnist_all.sqlite'
DEFAULT_NUM_CLIENTS = 3383  # TFF's EMNIST-10 writers.
SIZE_SIGMA = 0.7            # LogNormal(0, sigma) client weights.
TEST_FRACTION = 0.1
SPLITS = (('digits_only_train', 'digits_only_test'), ('all_train', 'all_test'))


def define_flags() -> None:
  """The binary's flags (defined when it runs, not on import: the test suite
  imports this module beside the training binaries' --cache_dir)."""
  flags.DEFINE_string('mnist', None, "Keras's mnist.npz (x_train, y_train, "
                      'x_test, y_test).')
  flags.DEFINE_string('cache_dir', None, 'Directory to write emnist_all.sqlite '
                      'into (created if missing).')
  flags.DEFINE_integer('num_clients', DEFAULT_NUM_CLIENTS,
                       'Clients (writers), 1..number of images.', lower_bound=1)
  flags.DEFINE_integer('num_images', 0, 'Use only the first N of the 70,000 '
                       'pooled images (0: all); e.g. a 100-client population '
                       'with the mean client size of 3,383 clients: '
                       '--num_clients=100 --num_images=2069.', lower_bound=0)
  flags.DEFINE_integer('seed', 0, 'Seed of the whole population, >= 0.',
                       lower_bound=0, upper_bound=2**32 - 1)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing '
                    'emnist_all.sqlite.')
  flags.mark_flag_as_required('mnist')
  flags.mark_flag_as_required('cache_dir')


FLAGS = flags.FLAGS


@dataclasses.dataclass
class Population:
  """Which pooled image goes where: `train[i]` / `test[i]` index the pooled
  images (MNIST's train images, then its test images) of client
  `client_ids[i]`; a client with no test image is listed in the test split
  (with 0 examples) iff `listed_empty[i]`."""
  client_ids: list
  train: list
  test: list
  listed_empty: np.ndarray

  @property
  def train_sizes(self) -> np.ndarray:
    return np.array([len(t) for t in self.train])

  @property
  def test_sizes(self) -> np.ndarray:
    return np.array([len(t) for t in self.test])


def build_population(num_images: int, *, num_clients: int,
                     seed: int) -> Population:
  """The scheme of the module docstring (no TensorFlow)."""
  if not 1 <= num_clients <= num_images:
    raise ValueError(f'num_clients must be in 1..{num_images} (the number of '
                     f'images), got {num_clients}')
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_images)
  weights = rng.lognormal(0.0, SIZE_SIGMA, num_clients)
  sizes = 1 + rng.multinomial(num_images - num_clients,
                              weights / weights.sum())
  num_test = np.floor(TEST_FRACTION * sizes + rng.random(num_clients))
  num_test = np.minimum(num_test.astype(np.int64), sizes - 1)
  listed_empty = (num_test == 0) & (rng.random(num_clients) < 0.5)
  suffixes = rng.integers(0, 100, num_clients)
  ends = np.cumsum(sizes)
  train, test = [], []
  for start, end, t in zip(ends - sizes, ends, num_test):
    train.append(order[start:end - t])
    test.append(order[end - t:end])
  return Population(
      client_ids=[f'f{i:04d}_{k:02d}' for i, k in enumerate(suffixes)],
      train=train, test=test, listed_empty=listed_empty)


def emnist_pixels(images: np.ndarray) -> np.ndarray:
  """MNIST's uint8 images (0 = background) as TFF's EMNIST pixels: float32
  1 - x / 255, so 1.0 is the background."""
  return (1.0 - images.astype(np.float64) / 255.0).astype(np.float32)


def write_population(path: str, population: Population, images: np.ndarray,
                     labels: np.ndarray) -> str:
  """Writes `population` of the pooled `images` (uint8 [N, 28, 28]) and
  `labels` to `path` in TFF's EMNIST format (every image serialized once)."""
  from perfed_tff.data import sql_files  # pylint: disable=g-import-not-at-top
  pixels = emnist_pixels(images)
  protos = [sql_files.emnist_example(pixels[i], int(labels[i]))
            for i in range(len(images))]
  train = {cid: [protos[j] for j in idx]
           for cid, idx in zip(population.client_ids, population.train)}
  test = {cid: [protos[j] for j in idx]
          for cid, idx, listed in zip(population.client_ids, population.test,
                                      population.listed_empty)
          if len(idx) or listed}
  splits = {}
  for train_split, test_split in SPLITS:
    splits[train_split] = train
    splits[test_split] = test
  return sql_files.write_sql_client_data(path, splits)


def summary_line(path: str, population: Population, seconds: float) -> str:
  train, test = population.train_sizes, population.test_sizes
  empty = test == 0
  listed = int((empty & population.listed_empty).sum())
  return (f'wrote {path}: {len(train)} clients, {int(train.sum())} train / '
          f'{int(test.sum())} test examples, {int(empty.sum())} clients with '
          f'an empty test split ({listed} listed with 0 examples, '
          f'{int(empty.sum()) - listed} not in it), train examples per client '
          f'min {int(train.min())} / median {float(np.median(train)):g} / max '
          f'{int(train.max())}, in {seconds:.1f}s')


def make(mnist: str, cache_dir: str, *, num_clients: int = DEFAULT_NUM_CLIENTS,
         seed: int = 0, overwrite: bool = False, num_images: int = 0) -> str:
  """Builds and writes the population; returns the summary line.

  Raises:
    checks.ArgumentError: a bad argument (named by its flag), before
      anything is written.
  """
  from perfed_tff.data import keras_files  # pylint: disable=g-import-not-at-top
  from perfed_tff.data import offline  # pylint: disable=g-import-not-at-top
  start = time.time()
  if not mnist:
    raise checks.ArgumentError('mnist', 'must be the path of an mnist.npz')
  if not cache_dir:
    raise checks.ArgumentError('cache_dir', 'must be a directory path')
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise checks.ArgumentError('cache_dir', f'{cache_dir} is not a directory')
  path = os.path.join(cache_dir, FILENAME)
  if os.path.exists(path) and not overwrite:
    raise checks.ArgumentError('cache_dir', f'{path} exists (pass '
                               '--overwrite to replace it)')
  try:
    x_train, y_train, x_test, y_test = keras_files.load_mnist_npz(mnist)
  except offline.DatasetUnavailableError as e:
    raise checks.ArgumentError('mnist', e.reason) from None
  images = np.concatenate([x_train, x_test])
  labels = np.concatenate([y_train, y_test])
  if num_images:
    if not 1 <= num_images <= len(images):
      raise checks.ArgumentError('num_images', f'must be between 1 and '
                                 f'{len(images)} (0: all), got {num_images}')
    images, labels = images[:num_images], labels[:num_images]
  if not 1 <= num_clients <= len(images):
    raise checks.ArgumentError('num_clients', f'must be between 1 and the '
                               f'number of images ({len(images)}), got '
                               f'{num_clients}')
  population = build_population(len(images), num_clients=num_clients,
                                seed=seed)
  parent = cache_dir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise checks.ArgumentError('cache_dir', f'directory {parent} is not '
                               'writable')
  os.makedirs(cache_dir, exist_ok=True)
  try:
    write_population(path, population, images, labels)
  except BaseException:
    _remove(f'{path}.partial')  # The library's temporary name.
    raise
  return summary_line(path, population, time.time() - start)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def main(argv):
  del argv
  # A signal raises (nothing half-written stays: see `make`).
  interrupts.start()
  try:
    line = make(FLAGS.mnist, FLAGS.cache_dir, num_clients=FLAGS.num_clients,
                seed=FLAGS.seed, overwrite=FLAGS.overwrite,
                num_images=FLAGS.num_images)
  except checks.ArgumentError as e:
    cli.fail(e.flag_message, checks.EXIT_USAGE, hard=True)
  except KeyboardInterrupt as e:
    what, status = cli.stopped(e)
    cli.fail(f'{what}; nothing was written', status, hard=True)
  except OSError as e:
    where = f' ({e.filename})' if e.filename else ''
    cli.fail(f'{e.strerror or e}{where}; nothing was written', 1, hard=True)
  print(line, flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
