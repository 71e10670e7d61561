"""`experiments/train.py` as a subprocess: every bad-input class gives one
line naming the flag and exit status 2 (the algorithms' argument rules
included); good runs print a summary; the optimizer flags train what the
library builds with the same optimizers, under --experiment_name, with the
settings recorded beside the metrics."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from perfed_tff.program import round_data
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
    # The library's rules for the algorithms' arguments (tests/
    # test_algorithms.py), as flags: FedAvg has no inner steps; beta is the
    # default client learning rate, so giving both is a clash.
    (('--algorithm=fedavg', '--inner_steps=2'), "--inner_steps: must be 1 for "
     "fedavg (inner steps are Per-FedAvg's nu; FedAvg takes none), got 2"),
    (('--beta=0.1', '--client_learning_rate=0.2'), '--client_learning_rate: '
     'and beta=0.1 both set the client learning rate (beta is its default); '
     'give only one'),
    (('--client_optimizer=adam', '--beta=0.05', '--client_learning_rate=0.2'),
     '--client_learning_rate: and beta=0.05 both set the client learning '
     'rate'),
    (('--client_adam_beta_1=0.5',), "--client_adam_beta_1: is a "
     "hyperparameter of the 'adam' optimizer, but client_optimizer is 'sgd'"),
    (('--server_optimizer=lamb',), "--server_optimizer: must be one of "
     "['sgd', 'adam', 'adamw', 'adagrad', 'yogi', 'rmsprop'], got 'lamb'"),
    (('--experiment_name=../up',), '--experiment_name: must be one folder '
     'name'),
], ids=['alpha', 'local_steps', 'algorithm', 'rounds', 'clients_per_round',
        'cache_dir', 'fedavg_inner_steps', 'beta_and_client_learning_rate',
        'default_beta_given_and_client_learning_rate', 'other_optimizers_flag',
        'unknown_optimizer', 'experiment_name'])
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
  # A corrupt latest checkpoint: set aside (renamed, kept) with a warning;
  # the run resumes from the newest intact one (each kind of damage:
  # test_program_checkpointing.py; none intact: test_experiments_train_faults).
  bad = ckpt / 'program_state_3'
  bad.mkdir()
  (bad / 'saved_model.pb').write_bytes(b'not a SavedModel')
  r = h.run(f'--root_output_dir={out}', '--rounds=2', timeout=180)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'warning: checkpoint round 3 (' in r.stderr, r.stderr[-2000:]
  assert 'resumed from round 2' in r.stdout
  aside = [n for n in os.listdir(ckpt) if n != 'program_state_2']
  assert len(aside) == 2 and 'program_state_0' in aside, aside
  aside.remove('program_state_0')
  assert aside[0].startswith('program_state_3.damaged-'), aside
  assert (ckpt / aside[0] / 'saved_model.pb').read_bytes() == (
      b'not a SavedModel')


@pytest.mark.slow
def test_optimizer_flags_train_what_the_library_builds(tmp_path):
  """--client_optimizer=adam --server_optimizer=sgd --server_sgd_momentum=0.9
  gives the final weights of `build_per_fedavg` with TFF's Adam (at beta)
  and SGD with momentum over the same rounds and data; the run goes under
  --experiment_name and records its settings (config.json, hparams.csv);
  resuming it with other optimizers is refused."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  import perfed_tff  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import settings as settings_lib  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  optimizers = ('--client_optimizer=adam', '--server_optimizer=sgd',
                '--server_sgd_momentum=0.9')
  r = h.run(f'--root_output_dir={out}', '--rounds=3', '--experiment_name=exp1',
            *optimizers, timeout=240)
  assert r.returncode == 0, r.stderr[-2000:]
  run_dir = out / 'exp1' / 'per_fedavg_fo'
  assert sorted(os.listdir(out)) == ['exp1']   # <root>/<experiment>/<alg>/
  assert f'hparams: {run_dir / "hparams.csv"}' in r.stdout
  with open(run_dir / 'hparams.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1
  fields = [f.name for f in dataclasses.fields(settings_lib.TrainingConfig)]
  assert list(rows[0]) == fields   # Every setting, one flat row.
  assert {k: rows[0][k] for k in ('algorithm', 'client_optimizer',
                                  'server_optimizer', 'server_sgd_momentum',
                                  'client_learning_rate', 'beta',
                                  'experiment_name', 'rounds')} == dict(
      algorithm='per_fedavg_fo', client_optimizer='adam',
      server_optimizer='sgd', server_sgd_momentum='0.9',
      client_learning_rate='', beta='0.05', experiment_name='exp1', rounds='3')
  with open(run_dir / 'config.json') as f:
    recorded = json.load(f)
  assert recorded['client_optimizer'] == 'adam'
  assert recorded['server_sgd_momentum'] == 0.9

  # The library, built with the same optimizers, on the same rounds' data.
  config = settings_lib.validate(settings_lib.TrainingConfig(
      algorithm='per_fedavg_fo', dataset='synthetic', rounds=3,
      clients_per_round=5, local_steps=2, batch_size=8, alpha=0.01,
      beta=0.05, seed=3, root_output_dir=str(tmp_path / 'unused')))
  task = round_data.load_task(config)
  process = perfed_tff.build_per_fedavg(
      task.functional_model(), variant='fo', alpha=0.01, local_steps=2,
      client_optimizer_fn=tff.learning.optimizers.build_adam(
          learning_rate=0.05),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(
          learning_rate=1.0, momentum=0.9))
  state = process.initialize()
  for round_num in range(1, 4):
    state = process.next(
        state, round_data.round_client_data(config, task, round_num)[1]
    ).state
  weights = process.get_model_weights(state)
  want = {f'trainable_{i}': np.asarray(w)
          for i, w in enumerate(weights.trainable)}
  got = h.final_weights(run_dir)
  assert int(got.pop('round')) == 3
  h.assert_weights_close(got, want, atol=1e-6)
  # Plain SGD would have given other weights.
  plain = h.run(f'--root_output_dir={out}', '--rounds=3', timeout=240)
  assert plain.returncode == 0, plain.stderr[-2000:]
  other = h.final_weights(out / 'per_fedavg_fo')
  assert max(np.abs(other[k] - want[k]).max() for k in want) > 1e-4

  # Resuming with another optimizer setting is refused, nothing touched.
  before = h.snapshot(run_dir)
  line = _bad(tmp_path, '--rounds=4', '--experiment_name=exp1',
              '--client_optimizer=adam', '--server_optimizer=sgd')
  assert ('was written by a different run: server_sgd_momentum=0.9 (this '
          'run: None)') in line, line
  assert h.snapshot(run_dir) == before


def test_worker_module_needs_a_port():
  r = subprocess.run([sys.executable, '-m', 'perfed_tff.runtime.worker'], env=h.env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert '--port: required' in r.stderr
