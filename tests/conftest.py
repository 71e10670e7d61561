"""Test session setup: one owned TFF execution context for the whole session,
and a check that no `worker_binary` outlives it."""

import os

import psutil
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end runs (still run in CI)')


def _worker_children():
  me = psutil.Process()
  return [p for p in me.children(recursive=True)
          if 'worker_binary' in ' '.join(p.cmdline() or [])]


@pytest.fixture(scope='session', autouse=True)
def tff_context():
  from perfed_tff.runtime import execution  # Imports TF/TFF once, here.
  with execution.ExecutionContext() as context:
    yield context
  execution.stop_all_workers()


def pytest_sessionfinish(session, exitstatus):
  try:
    from perfed_tff.runtime import execution
    execution.stop_all_workers()
  except ImportError:
    pass
  left = [p for p in _worker_children() if p.is_running()]
  if left:
    print(f'\nERROR: worker_binary processes left after the session: '
          f'{[p.pid for p in left]}')
    for p in left:
      p.kill()
    session.exitstatus = 1


# The real data files beside a checkout (`../shared/data`: MNIST's
# `mnist.npz`, Shakespeare's plays). CI has them; a user's machine may not,
# so the tests that read them skip with the reason.
SHARED_DATA_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data'))


@pytest.fixture
def shared_data():
  """The directory of the real data files; skips the test without it."""
  if not os.path.isdir(SHARED_DATA_DIR):
    pytest.skip(f'real data files not present ({SHARED_DATA_DIR}); CI has '
                'them beside the checkout')
  return SHARED_DATA_DIR
