"""The user split of Fallah, Mokhtari & Ozdaglar (NeurIPS 2020, Section 5).

A reusable partition of any labelled dataset with 10 classes (labels 0..9):

* Users: the `num_users` seen users 0..num_users-1, then the
  `num_unseen_users` unseen users (extra users drawn by the same rule, never
  trained on). Inside each of the two groups, of its m users the first
  floor(m / 2) are *five-class* users and the other ceil(m / 2) are
  *two-class* users (m = 50: users 0-24 and 25-49; an odd m has one more
  two-class user).
* A five-class user holds `a` images of each of classes 0-4 (5a images).
* A two-class user holds a/2 images of one class of 0-4 (its *low* class) and
  2a images of one class of 5-9 (its *high* class): 5a/2 images.
* Which classes: two seeded permutations P (of 0-4) and Q (of 5-9); the j-th
  two-class user (j = 0, 1, ... counted over the seen users, then over the
  unseen ones) gets low class P[j mod 5] and high class
  Q[(j + floor(j / 5)) mod 5]. So any 5 consecutive two-class users starting
  at a multiple of 5 hold each low and each high class once, and 25 of them
  hold each of the 25 (low, high) pairs once; every low (high) class is held
  by floor or ceil of B / 5 of all B two-class users.
* Images are drawn WITHOUT replacement: the images of each class are shuffled
  with the seed and handed out in user order, so no image belongs to two
  users, nor to both the train and the test part of one user. Images not
  needed are left unused.
* Train/test: every user's shard of one class (a, a/2 or 2a images, already in
  random order) is cut into its first round(train_fraction * s) images for
  training (Python's round; at least 1 and at most s - 1, so a shard of
  s >= 2 images gives at least one train and one test image) and the rest for
  testing; a shard of a single image (the a/2 shard when a = 2) is train only.

Class k needs a F + (a/2) L_k images for k in 0-4 and 2a H_k for k in 5-9, where
F is the number of five-class users and L_k (H_k) the number of two-class users
with low (high) class k. For 50 users: 25a + 5 (a/2) = 27.5a of each class in
0-4 and 10a of each class in 5-9. A class with fewer images raises a ValueError
naming the class (the one that limits `a` most), its size, the need and the
largest `a` that fits.

The split is a pure function of (labels, num_users, a, seed, train_fraction,
num_unseen_users): `np.random.default_rng(seed)` draws P, Q, then the
permutation of each class 0..9 in turn.
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np

from perfed_tff import checks

NUM_CLASSES = 10
LOW_CLASSES = (0, 1, 2, 3, 4)
HIGH_CLASSES = (5, 6, 7, 8, 9)


def _check_a(a) -> int:
  if (isinstance(a, bool) or not isinstance(a, numbers.Integral) or a < 2
      or a % 2):
    raise checks.ArgumentError('a', 'must be an even integer >= 2 (a/2 must '
                               f'be whole), got {a!r}')
  return int(a)


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)
      or (labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES))):
    raise checks.ArgumentError('labels', 'must be a 1-D int array with values '
                               f'in 0..9, got dtype {labels.dtype} shape '
                               f'{labels.shape}')
  return labels


def check_arguments(*, num_users: int = 50, a: int, seed: int,
                    train_fraction: float = 0.8, num_unseen_users: int = 0):
  """Validated (num_users, a, seed, train_fraction, num_unseen_users) of
  `paper_split`; `checks.ArgumentError` naming the first bad argument."""
  return (checks.integer('num_users', num_users, 1), _check_a(a),
          checks.integer('seed', seed, 0),
          checks.bounded_float('train_fraction', train_fraction, 0, 1,
                               low_open=True, high_open=True),
          checks.integer('num_unseen_users', num_unseen_users, 0))


def _user_classes(num_users: int, num_unseen_users: int, seed: int,
                  rng: Optional[np.random.Generator] = None):
  """[(None) for a five-class user | (low, high)], seen users then unseen.

  Draws P and Q from `rng` (a fresh `default_rng(seed)` when None)."""
  rng = np.random.default_rng(seed) if rng is None else rng
  low = np.asarray(LOW_CLASSES)[rng.permutation(len(LOW_CLASSES))]
  high = np.asarray(HIGH_CLASSES)[rng.permutation(len(HIGH_CLASSES))]
  users = []
  j = 0
  for m in (num_users, num_unseen_users):
    for u in range(m):
      if u < m // 2:
        users.append(None)
      else:
        users.append((int(low[j % 5]), int(high[(j + j // 5) % 5])))
        j += 1
  return users


def _half_a_units(users) -> np.ndarray:
  """Images class k needs per unit of a/2 (need_k = (a/2) * units_k)."""
  units = np.zeros(NUM_CLASSES, np.int64)
  for c in users:
    if c is None:
      units[list(LOW_CLASSES)] += 2
    else:
      units[c[0]] += 1
      units[c[1]] += 4
  return units


def largest_a(labels, *, num_users: int = 50, seed: int,
              num_unseen_users: int = 0) -> int:
  """The largest even `a` for which `paper_split` has enough images of every
  class (0 when not even a = 2 fits)."""
  labels = _check_labels(labels)
  num_users = checks.integer('num_users', num_users, 1)
  num_unseen_users = checks.integer('num_unseen_users', num_unseen_users, 0)
  seed = checks.integer('seed', seed, 0)
  units = _half_a_units(_user_classes(num_users, num_unseen_users, seed))
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  held = units > 0
  return 2 * int(np.min(counts[held] // units[held]))


def _train_count(size: int, train_fraction: float) -> int:
  if size < 2:
    return size
  return min(max(int(round(train_fraction * size)), 1), size - 1)


def paper_split(labels, *, num_users: int = 50, a: int, seed: int,
                train_fraction: float = 0.8, num_unseen_users: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Index sets of the paper's split (see the module docstring).

  Args:
    labels: int array [n] with values 0..9.
    num_users: seen users (>= 1); half five-class, half two-class.
    a: images per class of a five-class user; an even int >= 2 (two-class
      users hold a/2 and 2a).
    seed: int >= 0; the split is a pure function of the arguments.
    train_fraction: share of every class shard used for training, in (0, 1).
    num_unseen_users: extra users (>= 0) following the same rule, returned
      after the seen ones.

  Returns:
    A list of num_users + num_unseen_users (train_indices, test_indices)
    sorted int64 arrays into `labels`.

  Raises:
    ValueError: bad arguments, or a class with too few images for `a` and
      the number of users (the message names the class, its size and need).
  """
  labels = _check_labels(labels)
  num_users, a, seed, train_fraction, num_unseen_users = check_arguments(
      num_users=num_users, a=a, seed=seed, train_fraction=train_fraction,
      num_unseen_users=num_unseen_users)
  rng = np.random.default_rng(seed)
  users = _user_classes(num_users, num_unseen_users, seed, rng)
  units = _half_a_units(users)
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  short = [k for k in range(NUM_CLASSES) if counts[k] < units[k] * (a // 2)]
  if short:
    k = min(short, key=lambda k: counts[k] / units[k])  # The binding class.
    five = sum(c is None for c in users)
    fits = largest_a(labels, num_users=num_users, seed=seed,
                     num_unseen_users=num_unseen_users)
    hint = (f'the largest `a` that fits is {fits}' if fits
            else 'no even `a` >= 2 fits; use fewer users')
    raise ValueError(
        f'class {k} has {counts[k]} images, but `a`={a} for {len(users)} '
        f'users ({five} five-class, {len(users) - five} two-class) needs '
        f'{units[k] * (a // 2)}; {hint}.')
  pools = [rng.permutation(np.flatnonzero(labels == k))
           for k in range(NUM_CLASSES)]
  taken = np.zeros(NUM_CLASSES, np.int64)
  out = []
  for c in users:
    shards = ([(k, a) for k in LOW_CLASSES] if c is None
              else [(c[0], a // 2), (c[1], 2 * a)])
    train, test = [], []
    for k, size in shards:
      shard = pools[k][taken[k]:taken[k] + size]
      taken[k] += size
      n_train = _train_count(size, train_fraction)
      train.append(shard[:n_train])
      test.append(shard[n_train:])
    out.append((np.sort(np.concatenate(train)).astype(np.int64),
                np.sort(np.concatenate(test)).astype(np.int64)))
  return out
