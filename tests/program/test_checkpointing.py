"""Checkpoints (`perfed_tff/program/checkpointing.py`): the CheckpointManager
(a TFF program state manager; round trips, checks, partial and corrupt
saves, resuming past a damaged checkpoint, with `checkpoint_files`'
manifest)."""

import collections
import csv
import dataclasses
import os
import re

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff.program import checkpoint_files
from perfed_tff.program import checkpointing
from perfed_tff.program import event_loop
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import training_loop as tp
from tests import binary_helpers
from tests import tff_helpers

run_sync = event_loop.run_sync


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
  """`load` of one version reports a damaged checkpoint and leaves it; only
  `load_latest` (resuming) sets it aside, see below."""
  mgr = _manager(tmp_path)
  run_sync(mgr.save(_state(), 2))
  bad = tmp_path / 'program_state_4'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'garbage')
  with pytest.raises(checkpointing.CheckpointDamagedError,
                     match='program_state_4 is corrupt or unreadable'):
    run_sync(mgr.load(4, _state()))
  assert (bad / 'saved_model.pb').read_bytes() == b'garbage'


# ------------------------------------------------------- damaged checkpoints

DATA = 'variables/variables.data-00000-of-00001'
damage = binary_helpers.damage_checkpoint
REASONS = {
    'truncated': rf'truncated: {re.escape(DATA)} has \d+ of \d+ bytes',
    'bit_flip': rf'checksum mismatch: {re.escape(DATA)}',
    'bit_flip_no_manifest': r'DataLossError: .*Checksum does not match',
    'missing_part': r'missing part: variables/variables\.index',
    'empty_folder': r'an empty folder',
    'not_a_folder': r'not a folder',
}


@pytest.mark.parametrize('kind', sorted(REASONS))
def test_damaged_latest_checkpoint_is_set_aside_and_resume_is_exact(
    tmp_path, small_task, kind):
  """The newest checkpoint of this run is unreadable: the run resumes from
  the newest intact one (here one written before manifests existed) with one
  warning line, the damaged one renamed aside, byte for byte, and never
  deleted (keep_total=3 neither counts nor removes it); every round has one
  row and the weights are the uninterrupted run's."""
  config = tff_helpers.training_config(tmp_path, rounds=6)
  tp.run_training(config, task=small_task, process=tff_helpers.StubProcess())
  ckpts = tmp_path / 'per_fedavg_fo' / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == [
      'program_state_2', 'program_state_4', 'program_state_6']
  assert checkpoint_files.MANIFEST_NAME == 'perfed_tff_manifest.json'
  (ckpts / 'program_state_4' / checkpoint_files.MANIFEST_NAME).unlink()
  bad = ckpts / 'program_state_6'
  damage(bad, kind)
  kept = binary_helpers.snapshot(bad) if bad.is_dir() else bad.read_bytes()
  lines = []
  result = tp.run_training(dataclasses.replace(config, rounds=8),
                           task=small_task,
                           process=tff_helpers.StubProcess(),
                           write=lines.append)
  assert result.resumed_from == 4
  warnings = [l for l in lines if l.startswith('warning')]
  assert len(warnings) == 1, lines
  assert re.fullmatch(
      rf'warning: checkpoint round 6 \({re.escape(str(ckpts))}/program_state_6'
      rf'\) is unreadable \({REASONS[kind]}.*\); set aside as '
      r'(program_state_6\.damaged-\d{8}-\d{6}); resuming from round 4',
      warnings[0]), warnings[0]
  aside = re.search(r'set aside as (\S+);', warnings[0])[1]
  assert sorted(os.listdir(ckpts)) == [
      'program_state_4', 'program_state_6', aside, 'program_state_8']
  aside = ckpts / aside
  assert (binary_helpers.snapshot(aside) if aside.is_dir()
          else aside.read_bytes()) == kept
  with open(result.paths['train_csv']) as f:
    assert [int(r['round']) for r in csv.DictReader(f)] == list(range(1, 9))
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 8.0))


def test_no_intact_checkpoint_is_reported_and_nothing_changes(tmp_path):
  """Every checkpoint damaged: a long run is not started over on its own;
  the error says so, nothing is renamed, no warning."""
  lines = []
  mgr = _manager(tmp_path, {'a': 1}, write=lines.append)
  for r in (2, 4):
    run_sync(mgr.save(_state(), r))
  damage(tmp_path / 'program_state_2', 'truncated')
  damage(tmp_path / 'program_state_4', 'empty_folder')
  before = binary_helpers.snapshot(tmp_path)
  with pytest.raises(checkpointing.CheckpointError) as e:
    run_sync(mgr.load_latest(_state()))
  assert not isinstance(e.value, checkpointing.CheckpointDamagedError)
  assert re.fullmatch(
      rf'no intact checkpoint to resume in {re.escape(str(tmp_path))} '
      r'\(round 4: an empty folder; round 2: truncated: .*\); nothing was '
      r'changed. A run is not started over from round 0 on its own: to start '
      r'over, move that folder away \(or choose another `root_output_dir`\), '
      r'then rerun.', str(e.value)), str(e.value)
  assert binary_helpers.snapshot(tmp_path) == before and not lines


def test_another_runs_checkpoint_behind_a_damaged_one_is_refused(tmp_path):
  """A checkpoint of another run (other settings or shapes) keeps its
  message (exit 2 in the binaries) even behind a damaged newer one, and
  nothing is renamed."""
  lines = []
  mgr = _manager(tmp_path, {'a': 1})
  for r in (2, 4):
    run_sync(mgr.save(_state(), r))
  damage(tmp_path / 'program_state_4', 'missing_part')
  before = binary_helpers.snapshot(tmp_path)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'program_state_2 was written by a different run: '
                     r"a=1 \(this run: 2\); it was left untouched"):
    run_sync(_manager(tmp_path, {'a': 2}, write=lines.append).load_latest(
        _state()))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'program_state_2 does not fit this model: .*'
                     r'float32\(3, 2\).* needs .*float32\(4, 2\)'):
    run_sync(_manager(tmp_path, {'a': 1}, write=lines.append).load_latest(
        _state((4, 2))))
  assert binary_helpers.snapshot(tmp_path) == before and not lines


# A checkpoint written by the training program before the package took its
# three rings (commit f683bd7: `python -m experiments.train
# --algorithm=per_fedavg_fo --dataset=synthetic
# --dataset_options=num_users=6,max_examples_per_user=40
# --clients_per_round=3 --local_steps=1 --batch_size=8 --seed=1
# --eval_every=0 --checkpoint_every=1 --rounds=1`).
OLD_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'reference', 'checkpoint_f683bd7')
OLD_RUN = dict(algorithm='per_fedavg_fo', dataset='synthetic',
               dataset_options='num_users=6,max_examples_per_user=40',
               clients_per_round=3, local_steps=1, batch_size=8, seed=1,
               alpha=0.01, beta=0.05, eval_every=0, checkpoint_every=1,
               rounds=2)


def test_a_checkpoint_written_before_the_rings_resumes(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import outputs  # pylint: disable=g-import-not-at-top
  config = tff_helpers.training_config(tmp_path / 'old', **OLD_RUN)
  shutil.copytree(OLD_CHECKPOINT, outputs.output_paths(config)['checkpoints'])
  resumed = tp.run_training(config)
  assert resumed.resumed_from == 1
  fresh = tp.run_training(tff_helpers.training_config(tmp_path / 'new',
                                                      **OLD_RUN))
  old = metrics_lib.load_model_weights(resumed.paths['final_model'])
  new = metrics_lib.load_model_weights(fresh.paths['final_model'])
  for name in new:  # Its round 1 ran on another machine: a tolerance.
    np.testing.assert_allclose(old[name], new[name], rtol=1e-5, atol=1e-6)
