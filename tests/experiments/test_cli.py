"""The binaries' shared command line (`experiments/cli.py`)."""

import subprocess
import sys

from experiments import cli
from perfed_tff import algorithms
from perfed_tff.data import registry
from tests import binary_helpers


def test_first_line_of_a_multiline_worker_error():
  error = RuntimeError(
      'status = StatusCode.INVALID_ARGUMENT\n  details = "Received a label '
      'value of 12 which is outside the valid range of [0, 10)."\n debug')
  assert cli._first_line(error).startswith('details = "Received a label')


def test_one_flag_per_config_field_with_the_optimizers_help():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import settings as settings_lib  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(settings_lib.TrainingConfig)}
  assert set(cli._HELP) == fields
  assert set(cli.OPTIMIZER_FLAGS) == set(settings_lib.OPTIMIZER_FIELDS)
  text = cli._HELP['client_adam_beta_1']
  assert '--client_optimizer=adam' in text and 'build_adam' in text
  assert 'default 0.9' in text
  assert 'default none (plain SGD)' in cli._HELP['server_sgd_momentum']
  assert '--beta' in cli._HELP['client_learning_rate']


def test_helpfull_lists_every_registered_dataset_and_algorithm():
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.train', '--helpfull'],
      env=binary_helpers.env(), capture_output=True, text=True, timeout=240,
      stdin=subprocess.DEVNULL, cwd=binary_helpers.ROOT)
  # absl prints the help and exits 1; it wraps the text (joined again here).
  text = ' '.join(done.stdout.split())
  assert '--dataset:' in text, done.stderr[-2000:]

  def entry(flag):
    return text.split(f' --{flag}: ', 1)[1].split('(default:', 1)[0]

  for name in registry.DATASETS:
    assert f"'{name}'" in entry('dataset'), name
  for name in algorithms.ALGORITHMS:
    assert f"'{name}'" in entry('algorithm'), name


def test_dataset_and_algorithm_help_are_read_from_the_registries(
    monkeypatch):
  monkeypatch.setattr(registry, 'DATASETS',
                      registry.DATASETS + ('fake_dataset',))
  monkeypatch.setattr(algorithms, 'ALGORITHMS',
                      algorithms.ALGORITHMS + ('fake_algorithm',))
  assert "'paper_cifar10', 'paper_emnist', 'fake_dataset'" in (
      cli.dataset_help())
  assert "'per_fedavg_maml', 'fake_algorithm'" in cli.algorithm_help()
  assert cli._HELP['dataset'].startswith("One of 'emnist'")
