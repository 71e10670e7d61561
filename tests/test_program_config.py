"""The training program's configuration (`perfed_tff/program/config.py`):
validation and normalization, the flag/dataset-option ranges (bad input is
one line naming the flag, nothing written), the population check, the
output paths, an unreadable dataset file."""

import os

import pytest

from perfed_tff import checks
from perfed_tff.program import config as config_lib
from tests import tff_helpers as h


@pytest.mark.parametrize('field,value,flag_text', [
    ('alpha', 0.0, '--alpha: must be a finite number > 0'),
    ('beta', -1.0, '--beta: must be a finite number > 0'),
    ('delta', float('nan'), '--delta: must be a finite number > 0'),
    ('rounds', 0, '--rounds: must be an integer >= 1'),
    ('clients_per_round', 0, '--clients_per_round: must be an integer >= 1'),
    ('local_steps', 0, '--local_steps: must be an integer >= 1'),
    ('batch_size', 0, '--batch_size: must be an integer >= 1'),
    ('algorithm', 'sgd', "--algorithm: must be one of ['fedavg', "),
    ('dataset', 'mnist', "--dataset: must be one of ["),
    ('client_weighting', 'x', "--client_weighting: must be one of"),
    ('graph_optimization', 'xla', "--graph_optimization: must be one of"),
    ('workers', 'localhost', '--workers: must be a comma-separated list'),
    ('cache_dir', '/nonexistent/dir', '--cache_dir: directory'),
    ('dataset_options', {'bogus': 1}, '--dataset_options: unknown option'),
])
def test_validate_rejects(tmp_path, field, value, flag_text):
  with pytest.raises(checks.ArgumentError) as e:
    config_lib.validate(config_lib.TrainingConfig(root_output_dir=str(tmp_path),
                                          **{field: value}))
  assert e.value.flag_message.startswith(flag_text), e.value.flag_message
  assert e.value.name == field
  assert '\n' not in str(e.value)


def test_validate_output_dir_not_a_directory(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(checks.ArgumentError,
                     match='`root_output_dir` .* not a dir'):
    config_lib.validate(config_lib.TrainingConfig(
        root_output_dir=str(blocker / 'out')))


def test_validate_normalizes(tmp_path):
  c = config_lib.validate(config_lib.TrainingConfig(
      root_output_dir=str(tmp_path / 'new'), workers='a:1, b:2',
      dataset_options='num_users=12'))
  assert c.workers == ('a:1', 'b:2')
  assert c.dataset_options == {'num_users': 12}


def test_population_check(tmp_path, small_task):
  c = h.training_config(tmp_path, clients_per_round=9)
  with pytest.raises(checks.ArgumentError,
                     match=r'`clients_per_round` must be between 1 and the '
                     r"population of 'synthetic' \(8 clients\), got 9"):
    config_lib.check_population(c, len(small_task.client_ids))


_BASE = dict(algorithm='per_fedavg_fo', dataset='synthetic', rounds=2,
             clients_per_round=5, local_steps=2, batch_size=8, eval_every=0,
             progress=False)


# (overrides, flag named, text of the one line). The binary test runs a
# representative handful of these through experiments/train.py.
BAD_INPUTS = [
    (dict(alpha=1e39), 'alpha', 'float32-safe step size'),
    (dict(beta=1e300), 'beta', 'float32-safe step size'),
    (dict(beta=1e30), 'beta', 'float32-safe step size'),
    (dict(delta=1e30), 'delta', 'float32-safe step size'),
    (dict(alpha=1e-320), 'alpha', 'float32-safe step size'),
    (dict(beta=float('inf')), 'beta', 'must be a finite number > 0'),
    (dict(alpha=0.0), 'alpha', 'must be a finite number > 0'),
    (dict(seed=2**64), 'seed', 'must be an integer in 0..4294967295'),
    (dict(seed=1e30), 'seed', 'must be an integer in 0..4294967295'),
    (dict(seed=-1), 'seed', 'must be an integer in 0..4294967295'),
    (dict(local_steps=1000000), 'local_steps', 'must be <= 10000'),
    (dict(batch_size=100000000), 'batch_size', 'must be <= 1e+06'),
    (dict(rounds=10**8), 'rounds', 'must be <= 1e+07'),
    (dict(eval_steps=(0,)), 'eval_steps', 'must be an integer in 1..10000'),
    (dict(worker_timeout=0.0), 'worker_timeout', 'in [0.1, 604800]'),
    (dict(round_timeout=-1.0), 'round_timeout', 'in [1, 604800]'),
    (dict(round_timeout=float('nan')), 'round_timeout', 'in [1, 604800]'),
    (dict(dataset_options='num_unseen_users=-1'), 'dataset_options',
     'num_unseen_users must be an integer >= 0, got -1'),
    (dict(dataset_options='num_users=1'), 'dataset_options',
     'num_users must be an integer >= 2, got 1'),
    (dict(dataset_options='num_users=2.5'), 'dataset_options',
     'num_users must be an integer >= 2'),
    (dict(dataset_options='max_examples_per_user=0'), 'dataset_options',
     'max_examples_per_user must be an integer >= 2, got 0'),
    (dict(dataset_options='model_heterogeneity=inf'), 'dataset_options',
     'model_heterogeneity must be a number in [0, 100]'),
    (dict(dataset_options='input_heterogeneity=-1'), 'dataset_options',
     'input_heterogeneity must be a number in [0, 100]'),
    (dict(dataset_options='alpha=1,beta=1'), 'dataset_options',
     "renamed option(s) of dataset 'synthetic': use model_heterogeneity "
     'instead of alpha, input_heterogeneity instead of beta'),
    (dict(dataset_options='beta=0'), 'dataset_options',
     'use input_heterogeneity instead of beta'),
    (dict(dataset_options='train_fraction=0'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=1.0'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=2'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=0.999'), 'dataset_options',
     'leaves user'),
    (dict(dataset_options='num_users=200000'), 'dataset_options',
     'GiB, more than 50%'),
    (dict(batch_size=999999), 'batch_size', 'the most train examples a client'),
    (dict(dataset='digits', dataset_options='train_fraction=1.0'),
     'dataset_options', 'train_fraction must be a number in (0, 1)'),
    (dict(dataset='digits', dataset_options='classes_per_user=0'),
     'dataset_options', 'classes_per_user must be an integer >= 1, got 0'),
    # Checked before the dataset file is looked for.
    (dict(dataset='emnist', dataset_options='unseen_fraction=1'),
     'dataset_options', 'unseen_fraction must be a number in [0, 1), got 1'),
    (dict(dataset='emnist', dataset_options='download=yes'),
     'dataset_options', "download must be True or False, got 'yes'"),
    (dict(clients_per_round=31), 'clients_per_round', '(30 clients), got 31'),
]


def _check_like_the_binary(tmp_path, **overrides):
  """What `training_loop.run` checks before any work."""
  config = config_lib.validate(config_lib.TrainingConfig(
      **dict(_BASE, root_output_dir=str(tmp_path / 'out'), **overrides)))
  task = config_lib.load_task(config)
  config_lib.check_population(config, len(task.client_ids), task)
  return config


@pytest.mark.parametrize('overrides,flag,text', BAD_INPUTS,
                         ids=[str(r[0]) for r in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, overrides, flag,
                                               text):
  with pytest.raises(checks.ArgumentError) as e:
    _check_like_the_binary(tmp_path, **overrides)
  assert e.value.name == flag, e.value.flag_message
  assert text in e.value.flag_message, e.value.flag_message
  assert '\n' not in e.value.flag_message
  assert not os.path.exists(tmp_path / 'out')  # Nothing written.


def test_good_edges_are_accepted(tmp_path):
  _check_like_the_binary(tmp_path, alpha=1e-12, beta=1e6, seed=2**32 - 1,
                         dataset_options='num_users=2,train_fraction=0.5',
                         clients_per_round=2, round_timeout=1.0)


@pytest.mark.parametrize('path', ['/proc/perfed_tff_out', '/sys/perfed_out'])
def test_pseudo_filesystems_are_not_writable(path):
  with pytest.raises(checks.ArgumentError, match='is not writable'):
    config_lib.validate(config_lib.TrainingConfig(root_output_dir=path))


def test_things_in_the_way_of_the_outputs(tmp_path):
  run_dir = tmp_path / 'per_fedavg_fo'
  for blocker, kind in (('', 'not a directory'),
                        ('metrics', 'not a directory'),
                        ('checkpoints', 'not a directory'),
                        ('tensorboard', 'not a directory'),
                        ('config.json', 'not a regular file'),
                        ('final_model.npz', 'not a regular file')):
    path = run_dir / blocker if blocker else run_dir
    if kind == 'not a directory':
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text('x')
    else:
      path.mkdir(parents=True)
    with pytest.raises(checks.ArgumentError, match=kind) as e:
      config_lib.check_output_paths(config_lib.TrainingConfig(
          **dict(_BASE, root_output_dir=str(tmp_path))))
    assert e.value.name == 'root_output_dir'
    (os.remove if kind == 'not a directory' else os.rmdir)(path)


@pytest.mark.parametrize('content', [b'', b'not a sqlite database' * 10])
def test_corrupt_or_empty_sqlite_is_one_line(tmp_path, content):
  (tmp_path / 'emnist_all.sqlite').write_bytes(content)
  config = config_lib.validate(config_lib.TrainingConfig(
      dataset='emnist', cache_dir=str(tmp_path),
      root_output_dir=str(tmp_path / 'out')))
  with pytest.raises(checks.ArgumentError) as e:
    config_lib.load_task(config)
  assert e.value.name == 'cache_dir'
  assert 'the file there cannot be read' in e.value.flag_message
  assert '\n' not in e.value.flag_message
  assert (tmp_path / 'emnist_all.sqlite').read_bytes() == content
