"""Checkpoints (`perfed_tff/program/checkpointing.py`): the CheckpointManager
(a TFF program state manager; round trips, checks, partial and corrupt
saves) and the output-directory lock."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff import checks
from perfed_tff.program import checkpointing
from perfed_tff.runtime import supervision

run_sync = supervision.run_sync


def _state(shape=(3, 2)):
  return collections.OrderedDict(
      weights=[np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
               np.zeros(2, np.float32)],
      empty=(), lr=np.float32(0.5))


def _manager(path, metadata=None, **kw):
  return checkpointing.CheckpointManager(str(path), metadata=metadata or {},
                                         **kw)


def test_checkpoint_manager_is_a_tff_program_state_manager(tmp_path):
  assert isinstance(_manager(tmp_path), tff.program.ProgramStateManager)


def test_checkpoint_round_trip_and_checks(tmp_path):
  mgr = _manager(tmp_path, {'a': 1}, keep_total=2)
  assert run_sync(mgr.load_latest(_state())) == (None, 0)
  for r in (2, 4, 6):
    run_sync(mgr.save(_state(), r))
  assert run_sync(mgr.get_versions()) == [4, 6]
  state, r = run_sync(mgr.load_latest(_state()))
  assert r == 6
  np.testing.assert_array_equal(state['weights'][0], _state()['weights'][0])
  assert state['lr'] == np.float32(0.5) and state['empty'] == ()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"different run: a=1 \(this run: 2\)"):
    run_sync(_manager(tmp_path, {'a': 2}).load_latest(_state()))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'does not fit this model: .*float32\(3, 2\).*'
                     r'needs .*float32\(4, 2\)'):
    run_sync(mgr.load_latest(_state((4, 2))))


def test_partial_saves_are_removed(tmp_path):
  (tmp_path / 'program_state_4_temp1234').mkdir()
  mgr = _manager(tmp_path)
  assert os.listdir(tmp_path) == [] and mgr.latest_round() is None


def test_corrupt_checkpoint_is_reported_and_untouched(tmp_path):
  mgr = _manager(tmp_path)
  run_sync(mgr.save(_state(), 2))
  bad = tmp_path / 'program_state_4'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'garbage')
  with pytest.raises(checkpointing.CheckpointError,
                     match='program_state_4 is corrupt or unreadable'):
    run_sync(mgr.load_latest(_state()))
  assert (bad / 'saved_model.pb').read_bytes() == b'garbage'


_HOLDER = '''
import sys, time
sys.path.insert(0, {root!r})
from perfed_tff.program import checkpointing
lock = checkpointing.OutputDirLock({path!r}).__enter__()
print('locked', flush=True)
time.sleep(600)
'''


def test_output_dir_lock_refuses_then_takes_over_a_killed_holder(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER.format(root=root, path=str(tmp_path))],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checks.ArgumentError) as e:
      checkpointing.OutputDirLock(str(tmp_path)).__enter__()
    assert e.value.name == 'root_output_dir'
    assert f'is in use by a running run (pid {holder.pid} on ' in str(e.value)
  finally:
    holder.kill()
    holder.wait()
  with checkpointing.OutputDirLock(str(tmp_path)) as lock:
    assert lock.previous_owner['pid'] == holder.pid  # Stale: taken over.
    with checkpointing.OutputDirLock(str(tmp_path)):  # Re-entrant.
      pass
    owner = json.loads((tmp_path / checkpointing.LOCK_NAME).read_text())
    assert owner['pid'] == os.getpid()
  assert not (tmp_path / checkpointing.LOCK_NAME).exists()
