"""Test session setup: one owned TFF execution context for the whole session,
and a check that no `worker_binary` outlives it."""

import os

import psutil
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Every in-process test traces and compiles its computations (tests that
# count compilations or traces rely on it);
# tests/test_program_computation_cache.py and the cache tests turn the caches
# across runs on, each in its own folder. The binaries the tests start share
# one folder for the session (`binaries_computation_cache`).
os.environ['PERFED_TFF_COMPUTATION_CACHE'] = 'off'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end runs (still run in CI)')


def _worker_children():
  me = psutil.Process()
  return [p for p in me.children(recursive=True)
          if 'worker_binary' in ' '.join(p.cmdline() or [])]


@pytest.fixture(scope='session', autouse=True)
def binaries_computation_cache(tmp_path_factory):
  from tests import binary_helpers  # pylint: disable=g-import-not-at-top
  binary_helpers.COMPUTATION_CACHE = str(tmp_path_factory.mktemp(
      'binaries_computations'))
  yield binary_helpers.COMPUTATION_CACHE
  binary_helpers.COMPUTATION_CACHE = None


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


@pytest.fixture(scope='module')
def small_task():
  """A synthetic task of 8 clients (at most 60 examples each)."""
  from perfed_tff.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.load_synthetic(num_users=8, seed=1,
                                  max_examples_per_user=60)


@pytest.fixture(scope='module')
def eval_1_2():
  """The personalized evaluation of tff_helpers' EVAL_DIM x EVAL_CLASSES
  softmax regression at alpha 0.3, after 1 and 2 steps."""
  from perfed_tff import personalization_eval  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import linear  # pylint: disable=g-import-not-at-top
  from tests import tff_helpers as h  # pylint: disable=g-import-not-at-top
  return personalization_eval.build_personalized_evaluation(
      linear.softmax_regression_model_fn(h.EVAL_DIM, h.EVAL_CLASSES),
      alpha=0.3, adaptation_steps=(2, 1))


@pytest.fixture
def local_step_traces(monkeypatch):
  """A Counter whose 'local_step' counts, from the test's start, the Python
  traces of Per-FedAvg's local step (Python code runs only while TensorFlow
  traces)."""
  import collections  # pylint: disable=g-import-not-at-top
  from perfed_tff import per_fedavg_client_work as client_work  # pylint: disable=g-import-not-at-top
  traces = collections.Counter()
  step = client_work.per_fedavg_local_step

  def counting_step(*args, **kwargs):
    traces['local_step'] += 1
    return step(*args, **kwargs)

  monkeypatch.setattr(client_work, 'per_fedavg_local_step', counting_step)
  return traces
