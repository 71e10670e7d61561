"""The training program's configuration (`perfed_tff/program/config.py`):
validation and normalization, the flag/dataset-option ranges (bad input is
one line naming the flag, nothing written), the population check, the
output paths, an unreadable dataset file; the optimizer settings (checked,
built, part of the resume metadata), the experiment name and the settings
record (`hparams.csv`)."""

import dataclasses
import os

import pytest

from perfed_tff import checks
from perfed_tff.program import event_loop
from perfed_tff.program import outputs
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.program import settings as settings_lib
from tests import tff_helpers as h


@pytest.mark.parametrize('field,value,flag_text', [
    ('alpha', 0.0, '--alpha: must be a finite number > 0'),
    ('beta', -1.0, '--beta: must be a finite number > 0'),
    ('delta', float('nan'), '--delta: must be a finite number > 0'),
    ('rounds', 0, '--rounds: must be an integer >= 1'),
    ('clients_per_round', 0, '--clients_per_round: must be an integer >= 1'),
    ('local_steps', 0, '--local_steps: must be an integer >= 1'),
    ('batch_size', 0, '--batch_size: must be an integer >= 1'),
    ('algorithm', 'sgd', "--algorithm: must be one of ['fedavg', "),
    ('dataset', 'mnist', "--dataset: must be one of ["),
    ('client_weighting', 'x', "--client_weighting: must be one of"),
    ('graph_optimization', 'xla', "--graph_optimization: needs runtime "
     "'accelerated'"),
    ('workers', 'localhost', '--workers: must be a comma-separated list'),
    ('cache_dir', '/nonexistent/dir', '--cache_dir: directory'),
    ('dataset_options', {'bogus': 1}, '--dataset_options: unknown option'),
])
def test_validate_rejects(tmp_path, field, value, flag_text):
  with pytest.raises(checks.ArgumentError) as e:
    settings_lib.validate(settings_lib.TrainingConfig(root_output_dir=str(tmp_path),
                                          **{field: value}))
  assert e.value.flag_message.startswith(flag_text), e.value.flag_message
  assert e.value.name == field
  assert '\n' not in str(e.value)


def test_validate_output_dir_not_a_directory(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(checks.ArgumentError,
                     match='`root_output_dir` .* not a dir'):
    settings_lib.validate(settings_lib.TrainingConfig(
        root_output_dir=str(blocker / 'out')))


def test_validate_normalizes(tmp_path):
  c = settings_lib.validate(settings_lib.TrainingConfig(
      root_output_dir=str(tmp_path / 'new'), workers='a:1, b:2',
      dataset_options='num_users=12', runtime='owned'))
  assert c.workers == ('a:1', 'b:2')
  assert c.dataset_options == {'num_users': 12}


def test_population_check(tmp_path, small_task):
  c = h.training_config(tmp_path, clients_per_round=9)
  with pytest.raises(checks.ArgumentError,
                     match=r'`clients_per_round` must be between 1 and the '
                     r"population of 'synthetic' \(8 clients\), got 9"):
    round_data.check_population(c, len(small_task.client_ids))


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
  config = settings_lib.validate(settings_lib.TrainingConfig(
      **dict(_BASE, root_output_dir=str(tmp_path / 'out'), **overrides)))
  task = round_data.load_task(config)
  round_data.check_population(config, len(task.client_ids), task)
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
                         clients_per_round=2, round_timeout=1.0,
                         runtime='owned')


@pytest.mark.parametrize('field,value,runtime,needs', [
    ('workers', ('localhost:8000',), 'tff', "'owned' or 'accelerated'"),
    ('round_timeout', 60.0, 'tff', "'owned' or 'accelerated'"),
    ('graph_optimization', 'runtime', 'owned', "'accelerated'"),
    ('rounds_per_invocation', 5, 'tff', "'accelerated'"),
])
def test_ring_settings_need_their_ring(tmp_path, field, value, runtime, needs):
  """A setting only the outer ring reads is refused, in one line, where the
  run would not use it."""
  with pytest.raises(checks.ArgumentError) as e:
    h.training_config(tmp_path, runtime=runtime, **{field: value})
  assert e.value.name == field
  assert f'needs runtime {needs}' in e.value.flag_message
  h.training_config(tmp_path, runtime='accelerated', **{field: value})


def test_graph_optimization_is_the_accelerators_choice(tmp_path):
  with pytest.raises(checks.ArgumentError,
                     match='`graph_optimization` must be one of'):
    h.training_config(tmp_path, runtime='accelerated',
                      graph_optimization='xla')


def test_runtime_is_checked_by_name(tmp_path):
  with pytest.raises(checks.ArgumentError, match="`runtime` must be one of"):
    h.training_config(tmp_path, runtime='fast')
  assert h.training_config(tmp_path).runtime == 'tff'  # The library's default.


@pytest.mark.parametrize('path', ['/proc/perfed_tff_out', '/sys/perfed_out'])
def test_pseudo_filesystems_are_not_writable(path):
  with pytest.raises(checks.ArgumentError, match='is not writable'):
    settings_lib.validate(settings_lib.TrainingConfig(root_output_dir=path))


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
      outputs.check_output_paths(settings_lib.TrainingConfig(
          **dict(_BASE, root_output_dir=str(tmp_path))))
    assert e.value.name == 'root_output_dir'
    (os.remove if kind == 'not a directory' else os.rmdir)(path)


@pytest.mark.parametrize('content', [b'', b'not a sqlite database' * 10])
def test_corrupt_or_empty_sqlite_is_one_line(tmp_path, content):
  (tmp_path / 'emnist_all.sqlite').write_bytes(content)
  config = settings_lib.validate(settings_lib.TrainingConfig(
      dataset='emnist', cache_dir=str(tmp_path),
      root_output_dir=str(tmp_path / 'out')))
  with pytest.raises(checks.ArgumentError) as e:
    round_data.load_task(config)
  assert e.value.name == 'cache_dir'
  assert 'the file there cannot be read' in e.value.flag_message
  assert '\n' not in e.value.flag_message
  assert (tmp_path / 'emnist_all.sqlite').read_bytes() == content


# ---- Optimizers, the experiment name, the settings a run records ----

@pytest.mark.parametrize('overrides,flag,text', [
    (dict(client_optimizer='lamb'), 'client_optimizer',
     "must be one of ['sgd', 'adam', 'adamw', 'adagrad', 'yogi', 'rmsprop']"),
    (dict(server_optimizer='Adam'), 'server_optimizer', "got 'Adam'"),
    (dict(client_learning_rate=0.0), 'client_learning_rate',
     'must be a finite number > 0'),
    (dict(server_learning_rate=1e30), 'server_learning_rate',
     'float32-safe step size'),
    (dict(beta=0.1, client_learning_rate=0.2), 'client_learning_rate',
     'and beta=0.1 both set the client learning rate (beta is its default); '
     'give only one'),
    (dict(client_adam_beta_1=0.5), 'client_adam_beta_1',
     "is a hyperparameter of the 'adam' optimizer, but client_optimizer is "
     "'sgd'"),
    (dict(client_optimizer='adam', server_sgd_momentum=0.9,
          server_optimizer='yogi'), 'server_sgd_momentum',
     "is a hyperparameter of the 'sgd' optimizer, but server_optimizer is "
     "'yogi'"),
    (dict(server_sgd_momentum=1.0), 'server_sgd_momentum',
     'must be a number in [0, 1), got 1.0'),
    (dict(client_optimizer='rmsprop', client_rmsprop_epsilon=-1.0),
     'client_rmsprop_epsilon', 'must be a number in [0, 1e+06]'),
    (dict(algorithm='fedavg', inner_steps=2), 'inner_steps',
     "must be 1 for fedavg (inner steps are Per-FedAvg's nu; FedAvg takes "
     'none), got 2'),
    (dict(experiment_name='a/b'), 'experiment_name', 'must be one folder name'),
    (dict(experiment_name='..'), 'experiment_name', 'must be one folder name'),
    (dict(experiment_name=3), 'experiment_name', 'must be a folder name'),
])
def test_validate_rejects_optimizer_and_experiment_settings(tmp_path, overrides,
                                                            flag, text):
  with pytest.raises(checks.ArgumentError) as e:
    settings_lib.validate(settings_lib.TrainingConfig(
        **dict(_BASE, root_output_dir=str(tmp_path / 'out'), **overrides)))
  assert e.value.name == flag, e.value.flag_message
  assert e.value.flag_message.startswith(f'--{flag}: ')
  assert text in e.value.reason, e.value.reason
  assert not os.path.exists(tmp_path / 'out')


def test_optimizer_fields_are_the_builders_arguments():
  import inspect  # pylint: disable=g-import-not-at-top
  from perfed_tff import algorithms  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(settings_lib.TrainingConfig)}
  assert set(settings_lib.OPTIMIZER_FIELDS) <= fields
  assert set(settings_lib.OPTIMIZER_FIELDS) <= set(settings_lib.RESUME_KEYS)
  for name, (builder, hparams) in algorithms.OPTIMIZERS.items():
    taken = set(inspect.signature(builder).parameters) - {'learning_rate'}
    assert set(hparams) == taken, name
    for side in settings_lib.SIDES:
      assert {f for f in fields if f.startswith(f'{side}_{name}_')} == {
          f'{side}_{name}_{hp}' for hp in hparams}


def _optimizer_hparams(optimizer):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  state = optimizer.initialize([tf.TensorSpec([2], tf.float32)])
  return {k: float(v) for k, v in optimizer.get_hparams(state).items()}


def test_the_defaults_are_the_algorithms_own_optimizers(tmp_path):
  config = h.training_config(tmp_path)
  for side in settings_lib.SIDES:
    assert processes.is_default_optimizer(config, side)
    assert processes.build_optimizer(config, side) is None
  assert processes.learning_rate(config, 'client') == config.beta
  # Spelled out, the same optimizers.
  same = h.training_config(tmp_path, client_optimizer='sgd',
                           server_optimizer='sgd', server_learning_rate=1.0)
  assert processes.build_optimizer(same, 'client') is None
  assert processes.build_optimizer(same, 'server') is None


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw', 'adagrad', 'yogi',
                                  'rmsprop'])
def test_each_optimizer_is_built_from_its_settings(tmp_path, name):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from perfed_tff import algorithms  # pylint: disable=g-import-not-at-top
  values = dict(momentum=0.5, beta_1=0.8, beta_2=0.99, epsilon=1e-3,
                weight_decay=0.01, initial_preconditioner_value=0.2,
                decay=0.8)
  hparams = {hp: values[hp] for hp in algorithms.optimizer_hparams(name)}
  config = h.training_config(
      tmp_path, client_optimizer=name, server_optimizer=name,
      server_learning_rate=0.5, beta=0.03,
      **{f'{side}_{name}_{hp}': v for hp, v in hparams.items()
         for side in settings_lib.SIDES})
  builder = getattr(tff.learning.optimizers,
                    'build_sgdm' if name == 'sgd' else f'build_{name}')
  assert _optimizer_hparams(processes.build_optimizer(config, 'client')) == (
      pytest.approx(_optimizer_hparams(builder(0.03, **hparams))))
  assert _optimizer_hparams(processes.build_optimizer(config, 'server')) == (
      pytest.approx(_optimizer_hparams(builder(0.5, **hparams))))
  with_rate = h.training_config(tmp_path, client_optimizer=name,
                                client_learning_rate=0.2)
  assert _optimizer_hparams(processes.build_optimizer(
      with_rate, 'client'))['learning_rate'] == pytest.approx(0.2)


def test_resume_metadata_of_old_and_new_checkpoints(tmp_path):
  """The optimizer settings are part of the run's settings: a checkpoint
  with other optimizers is refused. Checkpoints written before these
  settings existed (without their keys) resume with the defaults only."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import checkpointing  # pylint: disable=g-import-not-at-top
  default = h.training_config(tmp_path)
  adam = h.training_config(tmp_path, client_optimizer='adam',
                           server_sgd_momentum=0.9)
  meta = default.resume_metadata()
  assert all(meta[k] is None for k in settings_lib.OPTIMIZER_FIELDS)
  assert adam.resume_metadata()['client_optimizer'] == 'adam'
  assert adam.resume_metadata()['server_sgd_momentum'] == 0.9
  old_meta = {k: v for k, v in meta.items()
              if k not in settings_lib.OPTIMIZER_FIELDS}
  state = {'w': np.arange(3, dtype=np.float32)}

  def save(path, metadata):
    event_loop.run_sync(checkpointing.CheckpointManager(
        str(path), metadata=metadata).save(state, 1))

  def load(path, config):
    return event_loop.run_sync(checkpointing.CheckpointManager(
        str(path), metadata=config.resume_metadata()).load(1, state))

  save(tmp_path / 'old', old_meta)
  np.testing.assert_array_equal(load(tmp_path / 'old', default)['w'],
                                state['w'])
  with pytest.raises(checkpointing.CheckpointError,
                     match="client_optimizer=None \\(this run: 'adam'\\)"):
    load(tmp_path / 'old', adam)
  save(tmp_path / 'new', adam.resume_metadata())
  load(tmp_path / 'new', adam)
  with pytest.raises(checkpointing.CheckpointError,
                     match='server_sgd_momentum=0.9 \\(this run: None\\)'):
    load(tmp_path / 'new', default)


def test_experiment_name_places_the_run(tmp_path):
  plain = settings_lib.TrainingConfig(root_output_dir=str(tmp_path))
  named = settings_lib.validate(settings_lib.TrainingConfig(
      root_output_dir=str(tmp_path), experiment_name='exp_1'))
  assert plain.run_dir == str(tmp_path / 'per_fedavg_hf')
  assert named.run_dir == str(tmp_path / 'exp_1' / 'per_fedavg_hf')
  assert 'experiment_name' not in settings_lib.RESUME_KEYS  # Where, not what.
  # Something in the way of the experiment's folder or of hparams.csv.
  (tmp_path / 'exp_1').write_text('x')
  with pytest.raises(checks.ArgumentError, match='exp_1 exists and is not a '
                     'directory'):
    outputs.check_output_paths(named)
  os.remove(tmp_path / 'exp_1')
  (tmp_path / 'exp_1' / 'per_fedavg_hf' / 'hparams.csv').mkdir(parents=True)
  with pytest.raises(checks.ArgumentError, match='hparams.csv exists and is '
                     'not a regular file'):
    outputs.check_output_paths(named)


def test_hparams_are_every_setting_flat(tmp_path):
  config = h.training_config(
      tmp_path, client_optimizer='adam', client_adam_beta_1=0.8,
      dataset_options='num_users=12,max_examples_per_user=30',
      eval_steps=(1, 5), experiment_name='e')
  row = config.to_hparams()
  assert list(row) == [f.name for f in dataclasses.fields(config)]
  assert all(isinstance(v, (str, int, float, bool)) for v in row.values())
  assert row['client_optimizer'] == 'adam' and row['client_adam_beta_1'] == 0.8
  assert row['client_adam_beta_2'] == '' and row['client_learning_rate'] == ''
  assert row['dataset_options'] == 'max_examples_per_user=30,num_users=12'
  assert row['eval_steps'] == '1,5' and row['experiment_name'] == 'e'


@pytest.mark.parametrize('algorithm', ['fedavg', 'per_fedavg_hf'])
def test_the_process_trains_with_the_configs_optimizers(tmp_path, small_task,
                                                         algorithm):
  config = h.training_config(tmp_path, algorithm=algorithm,
                             client_optimizer='adam',
                             client_learning_rate=0.02,
                             server_sgd_momentum=0.9)
  process = processes.build_process(config, small_task)
  hparams = process.get_hparams(process.initialize())
  # TFF's FedAvg: the client optimizer's hparams are client_work's own.
  client = hparams['client_work'].get('client_optimizer',
                                      hparams['client_work'])
  assert float(client['learning_rate']) == pytest.approx(0.02)
  assert float(client['beta_1']) == pytest.approx(0.9)  # build_adam's
  assert float(hparams['finalizer']['learning_rate']) == 1.0
  assert float(hparams['finalizer']['momentum']) == pytest.approx(0.9)
