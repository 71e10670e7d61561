"""Faults and bad input, in-process (fast): the flag/dataset-option ranges,
corrupt files, the output-directory lock, deferred interrupts, the watchdog,
divergence detection and TensorBoard pruning."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from experiments import cli
from perfed_tff import checks
from perfed_tff.program import checkpointing
from perfed_tff.program import config as config_lib
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import training_loop as tp
from perfed_tff.program import divergence
from perfed_tff.runtime import execution
from perfed_tff.runtime import supervision
from perfed_tff.runtime import worker as worker_lib

# ------------------------------------------------------------- bad input

_BASE = dict(algorithm='per_fedavg_fo', dataset='synthetic', rounds=2,
             clients_per_round=5, local_steps=2, batch_size=8, eval_every=0,
             progress=False)

# (overrides, flag named, text of the one line). The binary test runs a
# representative handful of these through experiments/train.py.
BAD_INPUTS = [
    (dict(alpha=1e39), 'alpha', 'float32-safe step size'),
    (dict(beta=1e300), 'beta', 'float32-safe step size'),
    (dict(beta=1e30), 'beta', 'float32-safe step size'),
    (dict(delta=1e30), 'delta', 'float32-safe step size'),
    (dict(alpha=1e-320), 'alpha', 'float32-safe step size'),
    (dict(beta=float('inf')), 'beta', 'must be a finite number > 0'),
    (dict(alpha=0.0), 'alpha', 'must be a finite number > 0'),
    (dict(seed=2**64), 'seed', 'must be an integer in 0..4294967295'),
    (dict(seed=1e30), 'seed', 'must be an integer in 0..4294967295'),
    (dict(seed=-1), 'seed', 'must be an integer in 0..4294967295'),
    (dict(local_steps=1000000), 'local_steps', 'must be <= 10000'),
    (dict(batch_size=100000000), 'batch_size', 'must be <= 1e+06'),
    (dict(rounds=10**8), 'rounds', 'must be <= 1e+07'),
    (dict(eval_steps=(0,)), 'eval_steps', 'must be an integer in 1..10000'),
    (dict(worker_timeout=0.0), 'worker_timeout', 'in [0.1, 604800]'),
    (dict(round_timeout=-1.0), 'round_timeout', 'in [1, 604800]'),
    (dict(round_timeout=float('nan')), 'round_timeout', 'in [1, 604800]'),
    (dict(dataset_options='num_unseen_users=-1'), 'dataset_options',
     'num_unseen_users must be an integer >= 0, got -1'),
    (dict(dataset_options='num_users=1'), 'dataset_options',
     'num_users must be an integer >= 2, got 1'),
    (dict(dataset_options='num_users=2.5'), 'dataset_options',
     'num_users must be an integer >= 2'),
    (dict(dataset_options='max_examples_per_user=0'), 'dataset_options',
     'max_examples_per_user must be an integer >= 2, got 0'),
    (dict(dataset_options='model_heterogeneity=inf'), 'dataset_options',
     'model_heterogeneity must be a number in [0, 100]'),
    (dict(dataset_options='input_heterogeneity=-1'), 'dataset_options',
     'input_heterogeneity must be a number in [0, 100]'),
    (dict(dataset_options='alpha=1,beta=1'), 'dataset_options',
     "renamed option(s) of dataset 'synthetic': use model_heterogeneity "
     'instead of alpha, input_heterogeneity instead of beta'),
    (dict(dataset_options='beta=0'), 'dataset_options',
     'use input_heterogeneity instead of beta'),
    (dict(dataset_options='train_fraction=0'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=1.0'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=2'), 'dataset_options',
     'train_fraction must be a number in (0, 1)'),
    (dict(dataset_options='train_fraction=0.999'), 'dataset_options',
     'leaves user'),
    (dict(dataset_options='num_users=200000'), 'dataset_options',
     'GiB, more than 50%'),
    (dict(batch_size=999999), 'batch_size', 'the most train examples a client'),
    (dict(dataset='digits', dataset_options='train_fraction=1.0'),
     'dataset_options', 'train_fraction must be a number in (0, 1)'),
    (dict(dataset='digits', dataset_options='classes_per_user=0'),
     'dataset_options', 'classes_per_user must be an integer >= 1, got 0'),
    # Checked before the dataset file is looked for.
    (dict(dataset='emnist', dataset_options='unseen_fraction=1'),
     'dataset_options', 'unseen_fraction must be a number in [0, 1), got 1'),
    (dict(dataset='emnist', dataset_options='download=yes'),
     'dataset_options', "download must be True or False, got 'yes'"),
    (dict(clients_per_round=31), 'clients_per_round', '(30 clients), got 31'),
]


def _check_like_the_binary(tmp_path, **overrides):
  """What `training_loop.run` checks before any work."""
  config = config_lib.validate(config_lib.TrainingConfig(
      **dict(_BASE, root_output_dir=str(tmp_path / 'out'), **overrides)))
  task = config_lib.load_task(config)
  config_lib.check_population(config, len(task.client_ids), task)
  return config


@pytest.mark.parametrize('overrides,flag,text', BAD_INPUTS,
                         ids=[str(r[0]) for r in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, overrides, flag,
                                               text):
  with pytest.raises(checks.ArgumentError) as e:
    _check_like_the_binary(tmp_path, **overrides)
  assert e.value.name == flag, e.value.flag_message
  assert text in e.value.flag_message, e.value.flag_message
  assert '\n' not in e.value.flag_message
  assert not os.path.exists(tmp_path / 'out')  # Nothing written.


def test_good_edges_are_accepted(tmp_path):
  _check_like_the_binary(tmp_path, alpha=1e-12, beta=1e6, seed=2**32 - 1,
                         dataset_options='num_users=2,train_fraction=0.5',
                         clients_per_round=2, round_timeout=1.0)


@pytest.mark.parametrize('path', ['/proc/perfed_tff_out', '/sys/perfed_out'])
def test_pseudo_filesystems_are_not_writable(path):
  with pytest.raises(checks.ArgumentError, match='is not writable'):
    config_lib.validate(config_lib.TrainingConfig(root_output_dir=path))


def test_things_in_the_way_of_the_outputs(tmp_path):
  run_dir = tmp_path / 'per_fedavg_fo'
  for blocker, kind in (('', 'not a directory'),
                        ('metrics', 'not a directory'),
                        ('checkpoints', 'not a directory'),
                        ('tensorboard', 'not a directory'),
                        ('config.json', 'not a regular file'),
                        ('final_model.npz', 'not a regular file')):
    path = run_dir / blocker if blocker else run_dir
    if kind == 'not a directory':
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text('x')
    else:
      path.mkdir(parents=True)
    with pytest.raises(checks.ArgumentError, match=kind) as e:
      config_lib.check_output_paths(config_lib.TrainingConfig(
          **dict(_BASE, root_output_dir=str(tmp_path))))
    assert e.value.name == 'root_output_dir'
    (os.remove if kind == 'not a directory' else os.rmdir)(path)


@pytest.mark.parametrize('content', [b'', b'not a sqlite database' * 10])
def test_corrupt_or_empty_sqlite_is_one_line(tmp_path, content):
  (tmp_path / 'emnist_all.sqlite').write_bytes(content)
  config = config_lib.validate(config_lib.TrainingConfig(
      dataset='emnist', cache_dir=str(tmp_path),
      root_output_dir=str(tmp_path / 'out')))
  with pytest.raises(checks.ArgumentError) as e:
    config_lib.load_task(config)
  assert e.value.name == 'cache_dir'
  assert 'the file there cannot be read' in e.value.flag_message
  assert '\n' not in e.value.flag_message
  assert (tmp_path / 'emnist_all.sqlite').read_bytes() == content


def test_garbage_csv_row_is_reported_untouched(tmp_path):
  path = tmp_path / 'train.csv'
  text = 'round,loss\n1,0.5\nxx,garbage\n3,0.3\n'
  path.write_text(text)
  with pytest.raises(metrics_lib.MetricsFileError,
                     match=r"train.csv line 3 is not a metrics row "
                     r"\(round='xx'\)"):
    metrics_lib.truncate_csv(str(path), 1)
  assert path.read_text() == text


# -------------------------------------------------------------- the lock

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


# ------------------------------------------------------------ interrupts

def test_interrupt_is_deferred_to_the_end_of_a_critical_section():
  previous = {s: signal.getsignal(s) for s in supervision.INTERRUPT_SIGNALS}
  try:
    supervision.install_interrupt_handlers()
    done = []
    with pytest.raises(supervision.Interrupted) as e:
      with supervision.critical_section():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # The handler has run: deferred.
        done.append(True)
    assert done == [True]
    assert e.value.signum == signal.SIGTERM and e.value.exit_status == 143
    with pytest.raises(supervision.Interrupted) as e:
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(1)
    assert e.value.exit_status == 129
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    supervision.clear_interrupt()


class _StubProcess:
  """A LearningProcess stand-in: w += 1 per round."""

  def initialize(self):
    return collections.OrderedDict(w=np.zeros(3, np.float32),
                                   count=np.int64(0))

  def next(self, state, data):
    del data
    r = int(state['count']) + 1
    new = collections.OrderedDict(w=state['w'] + 1.0, count=np.int64(r))
    metrics = collections.OrderedDict(client_work=collections.OrderedDict(
        train=collections.OrderedDict(loss=np.float32(1.0 / r))))
    return tff.learning.templates.LearningProcessOutput(new, metrics)

  def get_model_weights(self, state):
    return tff.learning.models.ModelWeights(trainable=[state['w']],
                                            non_trainable=[])


def _config(tmp_path, **kw):
  values = dict(_BASE, clients_per_round=3, rounds=4, checkpoint_every=1,
                root_output_dir=str(tmp_path))
  values.update(kw)
  return config_lib.validate(config_lib.TrainingConfig(**values))


@pytest.fixture(scope='module')
def small_task():
  from perfed_tff.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.load_synthetic(num_users=8, seed=1,
                                  max_examples_per_user=60)


def test_sigint_during_a_checkpoint_write_completes_it(tmp_path, small_task,
                                                       monkeypatch):
  """The signal arrives mid-save: the save finishes, then the run stops;
  the rerun resumes from that checkpoint."""
  real_save = tff.program.FileProgramStateManager.save

  async def slow_save(self, state, version):
    if version == 2:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
    await real_save(self, state, version)

  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save', slow_save)
  previous = {s: signal.getsignal(s) for s in supervision.INTERRUPT_SIGNALS}
  config = _config(tmp_path)
  try:
    supervision.install_interrupt_handlers()
    with pytest.raises(supervision.Interrupted) as e:
      tp.run_training(config, task=small_task, process=_StubProcess())
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    supervision.clear_interrupt()
  assert e.value.phase is None or 'checkpoint 2' in e.value.phase
  ckpts = tp.output_paths(config)['checkpoints']
  assert sorted(os.listdir(ckpts)) == ['program_state_0', 'program_state_1',
                                       'program_state_2']
  monkeypatch.setattr(tff.program.FileProgramStateManager, 'save', real_save)
  result = tp.run_training(config, task=small_task, process=_StubProcess())
  assert result.resumed_from == 2
  w = metrics_lib.load_model_weights(result.paths['final_model'])
  np.testing.assert_array_equal(w['trainable_0'], np.full(3, 4.0))


def test_garbage_row_in_existing_train_csv_is_a_checkpoint_error(
    tmp_path, small_task):
  config = _config(tmp_path, rounds=2)
  tp.run_training(config, task=small_task, process=_StubProcess())
  csv_path = tp.output_paths(config)['train_csv']
  with open(csv_path, 'a') as f:
    f.write('not,a,row\n')
  before = open(csv_path).read()
  with pytest.raises(tp.CheckpointError, match='is not a metrics row'):
    tp.run_training(_config(tmp_path, rounds=4), task=small_task,
                    process=_StubProcess())
  assert open(csv_path).read() == before


# --------------------------------------------------------------- watchdog

class _FakeContext:

  def __init__(self, bad=()):
    self.bad = list(bad)
    self.aborted = None
    self.local_workers = []

  def unhealthy(self, timeout):
    del timeout
    return self.bad

  def describe(self, address):
    return f'TFF worker at {address}'

  def abort(self, error):
    self.aborted = error


def test_watchdog_fails_a_phase_on_an_unhealthy_worker():
  context = _FakeContext([('h:1', 'did not answer a health check within 5s')])
  lines = []
  dog = supervision.Watchdog(round_timeout=0, health_timeout=5, write=lines.append,
                     context=context)
  try:
    dog.begin('round 4', 'round')
    deadline = time.monotonic() + 10
    while context.aborted is None and time.monotonic() < deadline:
      time.sleep(0.1)
    dog.end()
  finally:
    dog.stop()
  assert isinstance(context.aborted, execution.WorkerUnavailableError)
  assert str(context.aborted) == (
      'TFF worker at h:1 did not answer a health check within 5s during '
      'round 4; stopped the run.')
  assert dog.error is context.aborted


def test_watchdog_deadlines():
  dog = supervision.Watchdog(round_timeout=0, health_timeout=5, write=print)
  try:
    assert dog.deadline('initialization') == supervision.FIRST_ROUND_TIMEOUT
    assert dog.deadline('round') == supervision.FIRST_ROUND_TIMEOUT
    dog._seconds['round'] = [30.0, 0.1, 0.2, 10.0]  # First: compilation.
    assert dog.deadline('round') == 60.0  # max(60, 20 x median 0.2)
    dog._seconds['round'] = [30.0, 5.0, 5.0]
    assert dog.deadline('round') == 100.0
    assert dog.deadline('evaluation') == supervision.MIN_EVAL_TIMEOUT
  finally:
    dog.stop()
  explicit = supervision.Watchdog(round_timeout=1.0, health_timeout=5, write=print,
                          context=_FakeContext())
  try:
    explicit._seconds['round'] = [9.0]
    explicit.begin('round 2', 'round')
    deadline = time.monotonic() + 10
    while explicit.error is None and time.monotonic() < deadline:
      time.sleep(0.1)
    explicit.end()
  finally:
    explicit.stop()
  assert isinstance(explicit.error, execution.RoundTimeoutError)
  assert 'round 2 did not finish within its 1s deadline' in str(
      explicit.error)


# ------------------------------------------------------------- divergence

def _check(**kw):
  return divergence.DivergenceCheck(
      'run', clients_per_round=3, hyperparameters={'beta': 5.0, 'alpha': 0.1},
      **kw)


def _round(loss, non_finite=0, examples=30):
  return {'client_work': {'train': {
      'loss': np.float32(loss), 'num_non_finite_updates': np.int64(non_finite),
      'num_clients_without_step': np.int64(0),
      'num_examples': np.int64(examples)}}}


def test_every_update_non_finite_three_rounds_in_a_row_stops():
  check = _check()
  check.check(_round(2.0), 1)
  void = _round(0.0, non_finite=3, examples=0)
  check.check(void, 2)
  assert np.isnan(void['client_work']['train']['loss'])  # Not TFF's 0.0.
  check.check(_round(1.5), 3)  # A good round resets the count.
  check.check(_round(0.0, non_finite=3, examples=0), 4)
  check.check(_round(0.0, non_finite=2, examples=0), 5)
  with pytest.raises(divergence.DivergenceError,
                     match=r'no client update was usable .* in rounds 4-6; '
                     r'.* Likely too large: `beta`=5 or `alpha`=0.1') as e:
    check.check(_round(0.0, non_finite=3, examples=0), 6)
  assert e.value.round_num == 6
  # The binaries name the parameters as their flags.
  assert 'Likely too large: --beta=5 or --alpha=0.1' in cli.as_flags(
      str(e.value))


def test_exploding_loss_stops():
  check = _check()
  check.check(_round(2.3), 1)
  check.check(_round(50.0), 2)
  with pytest.raises(divergence.DivergenceError,
                     match=r'loss exploded to 2500 at round 3 \(first round: '
                     r'2.3'):
    check.check(_round(2500.0), 3)
  resumed = _check(reference_loss=2.3)
  with pytest.raises(divergence.DivergenceError):
    resumed.check(_round(1e5), 7)


def test_non_finite_loss_stops_but_is_no_divergence():
  check = _check()
  check.check(_round(2.0), 1)
  with pytest.raises(divergence.NonFiniteLossError,
                     match='global training loss is nan at round 2') as e:
    check.check(_round(float('nan')), 2)
  assert not isinstance(e.value, divergence.DivergenceError)


def test_prune_tensorboard_keeps_each_step_once(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step in range(1, 6):
      tf.summary.scalar('loss', float(step), step=step)
  writer.close()
  assert metrics_lib.prune_tensorboard(str(tmp_path), 3) == 2
  assert metrics_lib.prune_tensorboard(str(tmp_path), 3) == 0
  steps = []
  for name in os.listdir(tmp_path):
    for raw in tf.data.TFRecordDataset(str(tmp_path / name)):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      if event.HasField('summary'):
        steps.append(event.step)
  assert sorted(steps) == [1, 2, 3]


# ------------------------------------------------------------------ misc

def test_worker_refuses_a_busy_port():
  import socket  # pylint: disable=g-import-not-at-top
  sock = socket.socket()
  sock.bind(('', 0))
  sock.listen()
  try:
    assert worker_lib.port_in_use(sock.getsockname()[1])
  finally:
    sock.close()


def test_first_line_of_a_multiline_worker_error():
  error = RuntimeError(
      'status = StatusCode.INVALID_ARGUMENT\n  details = "Received a label '
      'value of 12 which is outside the valid range of [0, 10)."\n debug')
  assert cli._first_line(error).startswith('details = "Received a label')
