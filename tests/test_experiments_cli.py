"""The binaries' shared command line (`experiments/cli.py`)."""

from experiments import cli


def test_first_line_of_a_multiline_worker_error():
  error = RuntimeError(
      'status = StatusCode.INVALID_ARGUMENT\n  details = "Received a label '
      'value of 12 which is outside the valid range of [0, 10)."\n debug')
  assert cli._first_line(error).startswith('details = "Received a label')
