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
