"""The split of Fallah et al. (2020, Section 5): n users, half with `a` images
of each of classes 0-4, half with a/2 of one class of 0-4 and 2a of one of
5-9; no image used twice; seeded."""

import collections

import numpy as np
import pytest
from sklearn import datasets

from perfed_tff.data import paper_split as ps

DIGITS = datasets.load_digits().target           # 174..183 images per class
BIG = np.repeat(np.arange(10), 400)[np.random.default_rng(0).permutation(4000)]


def _histogram(labels, idx):
  return {int(k): int(v) for k, v in
          collections.Counter(labels[idx].tolist()).items()}


def _check_rule(labels, splits, num_users, num_unseen_users, a,
                train_fraction=0.8):
  """Every user's class histogram follows the rule exactly; returns the
  (low, high) class pair of every two-class user, in order."""
  assert len(splits) == num_users + num_unseen_users
  groups = ([(u, u) for u in range(num_users)]
            + [(num_users + u, u) for u in range(num_unseen_users)])
  sizes = {u: (num_users if u < num_users else num_unseen_users)
           for u, _ in groups}
  used = np.zeros(len(labels), int)
  pairs = []
  for u, rank in groups:
    train, test = splits[u]
    assert train.dtype == np.int64 and test.dtype == np.int64
    used[train] += 1
    used[test] += 1
    hist = _histogram(labels, np.concatenate([train, test]))
    if rank < sizes[u] // 2:                      # five-class user
      assert hist == {k: a for k in range(5)}, (u, hist)
    else:                                         # two-class user
      assert len(hist) == 2, (u, hist)
      low, high = sorted(hist)
      assert low < 5 <= high and hist == {low: a // 2, high: 2 * a}, (u, hist)
      pairs.append((low, high))
    tr, te = _histogram(labels, train), _histogram(labels, test)
    for k, s in hist.items():                    # per-class train/test cut
      n_train = s if s < 2 else min(max(round(train_fraction * s), 1), s - 1)
      assert tr.get(k, 0) == n_train and te.get(k, 0) == s - n_train
  assert used.max() <= 1                          # no image used twice
  return pairs


@pytest.mark.parametrize('labels,num_users,a,unseen', [
    (DIGITS, 50, 6, 0), (DIGITS, 10, 2, 0), (DIGITS, 7, 4, 3),
    (DIGITS, 1, 2, 0), (DIGITS, 2, 10, 1), (BIG, 50, 12, 10), (BIG, 13, 20, 0),
])
def test_every_user_follows_the_rule_and_no_image_is_used_twice(
    labels, num_users, a, unseen):
  splits = ps.paper_split(labels, num_users=num_users, a=a, seed=3,
                          num_unseen_users=unseen)
  _check_rule(labels, splits, num_users, unseen, a)


def test_paper_setting_spreads_classes_evenly():
  splits = ps.paper_split(BIG, num_users=50, a=12, seed=5)
  pairs = _check_rule(BIG, splits, 50, 0, 12)
  assert len(pairs) == 25 and len(set(pairs)) == 25   # all 25 (low, high)
  assert collections.Counter(p[0] for p in pairs) == {k: 5 for k in range(5)}
  assert (collections.Counter(p[1] for p in pairs)
          == {k: 5 for k in range(5, 10)})
  # Class 0-4: 25 a + 5 a/2 = 27.5 a images; classes 5-9: 10 a.
  used = np.bincount(BIG[np.concatenate([np.concatenate(s) for s in splits])])
  np.testing.assert_array_equal(used, [330] * 5 + [120] * 5)


def test_unseen_users_follow_the_rule_on_their_own():
  splits = ps.paper_split(DIGITS, num_users=6, a=4, seed=0, num_unseen_users=5)
  _check_rule(DIGITS, splits, 6, 5, 4)
  counts = [_histogram(DIGITS, np.concatenate(s)) for s in splits]
  kinds = ['five' if len(c) == 5 else 'two' for c in counts]
  assert kinds == ['five'] * 3 + ['two'] * 3 + ['five'] * 2 + ['two'] * 3
  seen_only = ps.paper_split(DIGITS, num_users=6, a=4, seed=0)
  assert ([_histogram(DIGITS, np.concatenate(s)) for s in seen_only]
          == [_histogram(DIGITS, np.concatenate(s)) for s in splits[:6]])


def test_hand_computed_small_split():
  labels = np.repeat(np.arange(10), 5)     # 5 images per class
  splits = ps.paper_split(labels, num_users=2, a=2, seed=0)
  (train0, test0), (train1, test1) = splits
  # User 0: 2 images of each of 0-4 -> round(1.6) = 2, capped at 1 train.
  assert len(train0) == 5 and len(test0) == 5
  assert sorted(labels[train0]) == [0, 1, 2, 3, 4] == sorted(labels[test0])
  # User 1: 1 image of its low class (train only), 4 of its high (3 + 1).
  assert len(train1) == 4 and len(test1) == 1
  assert labels[test1][0] >= 5 and (labels[train1] < 5).sum() == 1


def test_same_seed_same_split_other_seed_other_split():
  a = ps.paper_split(DIGITS, num_users=50, a=6, seed=4)
  b = ps.paper_split(DIGITS, num_users=50, a=6, seed=4)
  c = ps.paper_split(DIGITS, num_users=50, a=6, seed=5)
  for (tra, tea), (trb, teb) in zip(a, b):
    np.testing.assert_array_equal(tra, trb)
    np.testing.assert_array_equal(tea, teb)
  assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
  assert ([_histogram(DIGITS, np.concatenate(s)) for s in a]
          != [_histogram(DIGITS, np.concatenate(s)) for s in c])


def test_too_large_a_names_the_class_and_the_largest_a_that_fits():
  assert ps.largest_a(DIGITS, num_users=50, seed=0) == 6
  ps.paper_split(DIGITS, num_users=50, a=6, seed=0)
  with pytest.raises(ValueError) as info:
    ps.paper_split(DIGITS, num_users=50, a=8, seed=0)
  # Class 2 is the smallest of 0-4 (177 images); 25*8 + 5*4 = 220 needed.
  assert str(info.value) == (
      'class 2 has 177 images, but `a`=8 for 50 users (25 five-class, 25 '
      'two-class) needs 220; the largest `a` that fits is 6.')
  few_high = np.repeat(np.arange(10), [200] * 5 + [100] * 5)
  with pytest.raises(ValueError, match=r'^class [5-9] has 100 images, but '
                     r'`a`=60 for 2 users \(1 five-class, 1 two-class\) needs '
                     r'120; the largest `a` that fits is 50\.$'):
    ps.paper_split(few_high, num_users=2, a=60, seed=0)
  with pytest.raises(ValueError,
                     match='no even `a` >= 2 fits; use fewer users'):
    ps.paper_split(np.arange(10), num_users=3, a=2, seed=0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(a=5), r'`a` must be an even integer >= 2 \(a/2 must be whole\), got 5'),
    (dict(a=0), '`a` must be an even integer >= 2'),
    (dict(a=True), '`a` must be an even integer >= 2'),
    (dict(a=4.0), '`a` must be an even integer >= 2'),
    (dict(num_users=0), '`num_users` must be an integer >= 1, got 0'),
    (dict(num_users=2.5), '`num_users` must be an integer >= 1'),
    (dict(num_unseen_users=-1), '`num_unseen_users` must be an integer >= 0'),
    (dict(seed=-1), '`seed` must be an integer >= 0'),
    (dict(seed=None), '`seed` must be an integer >= 0'),
    (dict(train_fraction=1.0), r'`train_fraction` must be a number in \(0, 1\)'),
    (dict(train_fraction=0), r'`train_fraction` must be a number in \(0, 1\)'),
    (dict(labels=DIGITS.reshape(-1, 1)), '`labels` must be a 1-D int array'),
    (dict(labels=DIGITS.astype(float)), '`labels` must be a 1-D int array'),
    (dict(labels=np.append(DIGITS, 10)), 'with values in 0..9'),
    (dict(labels=np.append(DIGITS, -1)), 'with values in 0..9'),
])
def test_invalid_arguments(kwargs, match):
  args = dict(labels=DIGITS, num_users=4, a=2, seed=0)
  args.update(kwargs)
  labels = args.pop('labels')
  with pytest.raises(ValueError, match=match):
    ps.paper_split(labels, **args)
