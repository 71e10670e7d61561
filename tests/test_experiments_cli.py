"""The binaries' shared command line (`experiments/cli.py`)."""

from experiments import cli


def test_first_line_of_a_multiline_worker_error():
  error = RuntimeError(
      'status = StatusCode.INVALID_ARGUMENT\n  details = "Received a label '
      'value of 12 which is outside the valid range of [0, 10)."\n debug')
  assert cli._first_line(error).startswith('details = "Received a label')


def test_one_flag_per_config_field_with_the_optimizers_help():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import config as config_lib  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(config_lib.TrainingConfig)}
  assert set(cli._HELP) == fields
  assert set(cli.OPTIMIZER_FLAGS) == set(config_lib.OPTIMIZER_FIELDS)
  text = cli._HELP['client_adam_beta_1']
  assert '--client_optimizer=adam' in text and 'build_adam' in text
  assert 'default 0.9' in text
  assert 'default none (plain SGD)' in cli._HELP['server_sgd_momentum']
  assert '--beta' in cli._HELP['client_learning_rate']
