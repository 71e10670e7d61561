"""`experiments/train.py` as a subprocess: every bad-input class gives one
line naming the flag and exit status 2; good runs print a summary."""

import os
import subprocess
import sys

import pytest

from tests import binary_helpers as h


def _bad(tmp_path, *flags):
  r = h.run(f'--root_output_dir={tmp_path / "out"}', '--rounds=2', *flags,
            timeout=120)
  assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
  errors = [l for l in r.stderr.splitlines() if l.startswith('train.py: error')]
  assert len(errors) == 1, r.stderr[-2000:]
  return errors[0]


@pytest.mark.parametrize('flags,expected', [
    (('--alpha=0',), '--alpha: must be a finite number > 0, got 0.0'),
    (('--local_steps=0',), '--local_steps: must be an integer >= 1, got 0'),
    (('--algorithm=sgd',), "--algorithm: must be one of ['fedavg', "
     "'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml'], got 'sgd'"),
    (('--rounds=many',), "flag --rounds=many: invalid literal for int()"),
    (('--clients_per_round=31',), "--clients_per_round: must be between 1 and "
     "the population of 'synthetic' (30 clients), got 31"),
    (('--cache_dir=/nonexistent/tff_cache',), "--cache_dir: directory "
     "'/nonexistent/tff_cache' does not exist"),
])
def test_bad_flag(tmp_path, flags, expected):
  assert expected in _bad(tmp_path, *flags)


def _garbage_csv(out):
  metrics = out / 'per_fedavg_fo' / 'metrics'
  metrics.mkdir(parents=True)
  (metrics / 'train.csv').write_text('round,loss\n1,0.5\n##garbage##\n')


def _file_as_run_folder(out):
  (out / 'per_fedavg_fo').mkdir(parents=True)
  (out / 'per_fedavg_fo' / 'checkpoints').write_text('not a folder')


# A representative handful of tests/test_program_config.py's BAD_INPUTS
# (checked there in-process), end to end: exit 2, one line, no traceback,
# nothing in the output directory changed.
@pytest.mark.parametrize('flags,prepare,expected', [
    (('--beta=1e300',), None, '--beta: must be in [1e-12, 1e+06] (a '
     'float32-safe step size), got 1e+300'),
    (('--dataset_options=num_unseen_users=-1',), None, '--dataset_options: '
     'num_unseen_users must be an integer >= 0, got -1'),
    (('--seed=18446744073709551616',), None, '--seed: must be an integer in '
     '0..4294967295, got 18446744073709551616'),
    (('--root_output_dir=/proc/perfed_tff_out',), None, '--root_output_dir: '
     'directory /proc is not writable'),
    ((), _garbage_csv, "train.csv line 3 is not a metrics row "
     "(round='##garbage##'); it was left untouched"),
    ((), _file_as_run_folder, 'per_fedavg_fo/checkpoints exists and is not a '
     'directory'),
], ids=['beta', 'unseen', 'seed', 'proc', 'csv', 'run_folder'])
def test_bad_input_end_to_end(tmp_path, flags, prepare, expected):
  out = tmp_path / 'out'
  out.mkdir()
  if prepare:
    prepare(out)
  before = h.snapshot(out)
  r = h.run(f'--root_output_dir={out}', '--rounds=2', *flags, timeout=120)
  line = h.assert_one_error_line(r.stderr)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert expected in line, line
  assert h.snapshot(out) == before  # Also: no lock file left.


def test_output_dir_not_writable(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  line = _bad(tmp_path, f'--root_output_dir={blocker}/out')
  assert '--root_output_dir:' in line and 'is not a directory' in line


@pytest.mark.slow
def test_corrupt_and_incompatible_checkpoints(tmp_path):
  out = tmp_path / 'out'
  r = h.run(f'--root_output_dir={out}', '--rounds=2', timeout=180)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'per_fedavg_fo: 2 rounds' in r.stdout
  assert 'final_model: ' in r.stdout
  ckpt = out / 'per_fedavg_fo' / 'checkpoints'
  # Other settings: refused, checkpoint untouched.
  line = _bad(tmp_path, '--beta=0.1', '--rounds=4')
  assert 'was written by a different run: beta=0.05 (this run: 0.1)' in line
  assert sorted(os.listdir(ckpt)) == ['program_state_0', 'program_state_2']
  # A corrupt latest checkpoint: refused, left as it is.
  bad = ckpt / 'program_state_3'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'not a SavedModel')
  line = _bad(tmp_path, '--rounds=4')
  assert 'program_state_3 is corrupt or unreadable' in line
  assert 'left untouched' in line
  assert (bad / 'saved_model.pb').read_bytes() == b'not a SavedModel'
  assert sorted(os.listdir(ckpt)) == ['program_state_0', 'program_state_2',
                                      'program_state_3']


def test_worker_module_needs_a_port():
  r = subprocess.run([sys.executable, '-m', 'perfed_tff.runtime.worker'], env=h.env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert '--port: required' in r.stderr
