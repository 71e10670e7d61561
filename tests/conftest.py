"""Test session setup: shared fixtures, and a check that no `worker_binary`
outlives the session.

Each ring's tests run in its own TFF context (`tests/contexts.py`): the
library (`tests/core`) and the training program (`tests/program`) under
TFF's own stock context, the outer ring's runtime (`tests/runtime`) under
the owned `ExecutionContext`, the accelerator (`tests/accelerator`) and the
binaries' in-process tests (`tests/experiments`) under the
`AcceleratedContext`; each folder's conftest opens it for its tests."""

import os
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Every in-process test traces and compiles its computations (tests that
# count compilations or traces rely on it);
# tests/accelerator/test_computation_cache.py and the cache tests turn the caches
# across runs on, each in its own folder. The binaries the tests start share
# one folder for the session (`binaries_computation_cache`).
os.environ['PERFED_TFF_COMPUTATION_CACHE'] = 'off'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end runs (still run in CI)')


@pytest.fixture(scope='session', autouse=True)
def binaries_computation_cache(tmp_path_factory):
  from tests import binary_helpers  # pylint: disable=g-import-not-at-top
  binary_helpers.COMPUTATION_CACHE = str(tmp_path_factory.mktemp(
      'binaries_computations'))
  yield binary_helpers.COMPUTATION_CACHE
  binary_helpers.COMPUTATION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
  from tests import contexts  # pylint: disable=g-import-not-at-top
  local_worker = sys.modules.get('perfed_tff.runtime.local_worker')
  if local_worker is not None:
    local_worker.stop_all_workers()
  contexts.stop_tff_service_managers()
  left = [p for p in contexts.worker_children() if p.is_running()]
  if left:
    print(f'\nERROR: worker_binary processes left after the session: '
          f'{[p.pid for p in left]}')
    contexts.stop_worker_children()
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
  softmax regression after 1 and 2 steps (called at alpha 0.3 by the
  tests)."""
  from perfed_tff import personalization_eval  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import linear  # pylint: disable=g-import-not-at-top
  from tests import tff_helpers as h  # pylint: disable=g-import-not-at-top
  return personalization_eval.build_personalized_evaluation(
      linear.softmax_regression_model_fn(h.EVAL_DIM, h.EVAL_CLASSES),
      adaptation_steps=(2, 1))


@pytest.fixture
def local_step_traces(monkeypatch):
  """A Counter whose 'local_step' counts, from the test's start, the Python
  traces of Per-FedAvg's local step (Python code runs only while TensorFlow
  traces)."""
  import collections  # pylint: disable=g-import-not-at-top
  from perfed_tff import per_fedavg_step as step_lib  # pylint: disable=g-import-not-at-top
  traces = collections.Counter()
  step = step_lib.per_fedavg_local_step

  def counting_step(*args, **kwargs):
    traces['local_step'] += 1
    return step(*args, **kwargs)

  monkeypatch.setattr(step_lib, 'per_fedavg_local_step', counting_step)
  return traces
