"""`perfed_tff/algorithms.py`: the one rule for the algorithms' arguments
(`build_algorithm` accepts and rejects what `build_per_fedavg` does, FedAvg
included) and the optimizers a run can name (`build_optimizer`)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import perfed_tff
from perfed_tff import algorithms
from perfed_tff import checks
from tests import tff_helpers as h

BUILDERS = {
    'build_per_fedavg': lambda **kw: perfed_tff.build_per_fedavg(
        h.MODEL_FN, variant='fo', **kw),
    'build_algorithm_per_fedavg_fo': lambda **kw: algorithms.build_algorithm(
        'per_fedavg_fo', h.MODEL_FN, **kw),
    'build_algorithm_fedavg': lambda **kw: algorithms.build_algorithm(
        'fedavg', h.MODEL_FN, **kw),
}

# (arguments besides alpha=0.1, local_steps=1; the parameter the error
# names; text of the error). Every builder rejects them with the same error.
REJECTED = [
    (dict(beta=0.1, client_optimizer_fn=tff.learning.optimizers.build_sgdm(
        0.1)), 'beta', 'is the learning rate of the default client optimizer'),
    (dict(), 'beta', 'is required unless client_optimizer_fn is given'),
    (dict(beta=0.0), 'beta', 'must be a finite number > 0'),
    (dict(beta=0.1, inner_steps=0), 'inner_steps', 'must be an integer >= 1'),
    (dict(beta=0.1, local_steps=0), 'local_steps', 'must be an integer >= 1'),
    (dict(beta=0.1, alpha=0.0), 'alpha', 'must be a finite number > 0'),
    (dict(beta=0.1, delta=-1.0), 'delta', 'must be a finite number > 0'),
    (dict(client_weighting='all'), 'client_weighting',
     "must be a tff.learning.ClientWeighting or one of ['num_examples', "
     "'uniform'], got 'all'"),
]


@pytest.mark.parametrize('kwargs,name,text', REJECTED,
                         ids=[f'{r[1]}-{i}' for i, r in enumerate(REJECTED)])
def test_every_builder_rejects_the_same_arguments_the_same_way(kwargs, name,
                                                               text):
  messages = set()
  for builder in BUILDERS.values():
    with pytest.raises(checks.ArgumentError) as e:
      builder(**dict(dict(alpha=0.1, local_steps=1), **kwargs))
    assert e.value.name == name
    assert text in str(e.value)
    messages.add(str(e.value))
  assert len(messages) == 1, messages


def _flat_hparam_names(hparams) -> set:
  out = set()
  for key, value in hparams.items():
    out.add(key)
    if isinstance(value, dict):
      out |= _flat_hparam_names(value)
  return out


@pytest.mark.parametrize('builder', list(BUILDERS))
def test_every_builder_takes_beta_or_a_client_optimizer(builder):
  with_beta = BUILDERS[builder](alpha=0.1, beta=0.1, local_steps=1)
  names = _flat_hparam_names(with_beta.get_hparams(with_beta.initialize()))
  assert 'learning_rate' in names and 'beta_1' not in names
  with_adam = BUILDERS[builder](
      alpha=0.1, local_steps=1,
      client_optimizer_fn=tff.learning.optimizers.build_adam(0.02))
  names = _flat_hparam_names(with_adam.get_hparams(with_adam.initialize()))
  assert 'beta_1' in names  # The client optimizer is the given Adam.


def test_inner_steps_are_per_fedavg_only():
  for builder in ('build_per_fedavg', 'build_algorithm_per_fedavg_fo'):
    BUILDERS[builder](alpha=0.1, beta=0.1, local_steps=1, inner_steps=2)
  with pytest.raises(checks.ArgumentError) as e:
    BUILDERS['build_algorithm_fedavg'](alpha=0.1, beta=0.1, local_steps=1,
                                       inner_steps=2)
  assert e.value.name == 'inner_steps'
  assert str(e.value) == ("`inner_steps` must be 1 for fedavg (inner steps are "
                          "Per-FedAvg's nu; FedAvg takes none), got 2.")
  assert algorithms.check_inner_steps('fedavg', 1) == 1
  assert algorithms.check_inner_steps('per_fedavg_hf', 3) == 3


HPARAM_VALUES = dict(momentum=0.5, beta_1=0.8, beta_2=0.99, epsilon=1e-3,
                     weight_decay=0.01, initial_preconditioner_value=0.2,
                     decay=0.8)
TFF_BUILDERS = {
    'sgd': tff.learning.optimizers.build_sgdm,
    'adam': tff.learning.optimizers.build_adam,
    'adamw': tff.learning.optimizers.build_adamw,
    'adagrad': tff.learning.optimizers.build_adagrad,
    'yogi': tff.learning.optimizers.build_yogi,
    'rmsprop': tff.learning.optimizers.build_rmsprop,
}


def _hparams(optimizer):
  spec = [tf.TensorSpec([3], tf.float32)]
  return {k: float(v) for k, v in
          optimizer.get_hparams(optimizer.initialize(spec)).items()}


@pytest.mark.parametrize('name', list(algorithms.OPTIMIZERS))
def test_build_optimizer_is_tffs_builder(name):
  assert set(algorithms.OPTIMIZERS) == set(TFF_BUILDERS)
  hparams = {hp: HPARAM_VALUES[hp] for hp in algorithms.optimizer_hparams(name)}
  got = algorithms.build_optimizer(name, 0.3, **hparams)
  want = TFF_BUILDERS[name](0.3, **hparams)
  assert type(got) is type(want)
  assert _hparams(got) == pytest.approx(_hparams(want))
  assert _hparams(got)['learning_rate'] == pytest.approx(0.3)
  # Left out (or None): the builder's defaults.
  assert _hparams(algorithms.build_optimizer(
      name, 0.3, **{hp: None for hp in hparams})) == pytest.approx(
          _hparams(TFF_BUILDERS[name](0.3)))


@pytest.mark.parametrize('args,kwargs,name,text', [
    (('lamb', 0.1), dict(prefix='client_'), 'client_optimizer',
     "must be one of ['sgd', 'adam', 'adamw', 'adagrad', 'yogi', 'rmsprop']"),
    (('adam', 0.0), dict(prefix='server_'), 'server_learning_rate',
     'must be a finite number > 0'),
    (('adam', 1e30), dict(), 'learning_rate', 'float32-safe step size'),
    (('sgd', 0.1), dict(prefix='client_', beta_1=0.9), 'client_sgd_beta_1',
     "is not a hyperparameter of 'sgd' (it takes ['momentum'])"),
    (('adam', 0.1), dict(beta_2=1.0), 'adam_beta_2', 'in [0, 1)'),
    (('sgd', 0.1), dict(prefix='server_', momentum=-0.1),
     'server_sgd_momentum', 'in [0, 1)'),
    (('yogi', 0.1), dict(epsilon=float('nan')), 'yogi_epsilon',
     'in [0, 1e+06]'),
    (('adamw', 0.1), dict(weight_decay=-1.0), 'adamw_weight_decay',
     'in [0, 1e+06]'),
])
def test_build_optimizer_rejects(args, kwargs, name, text):
  with pytest.raises(checks.ArgumentError) as e:
    algorithms.build_optimizer(*args, **kwargs)
  assert e.value.name == name
  assert text in e.value.reason, e.value.reason


def test_a_built_optimizer_trains_like_tffs():
  """One FedAvg round with `build_optimizer`'s Adam and SGD with momentum
  equals one with TFF's builders."""
  clients = [h.dataset(*h.random_client(s, 12), 4) for s in (1, 2)]
  weights = []
  for client, server in (
      (algorithms.build_optimizer('adam', 0.05, beta_1=0.8),
       algorithms.build_optimizer('sgd', 1.0, momentum=0.9)),
      (tff.learning.optimizers.build_adam(0.05, beta_1=0.8),
       tff.learning.optimizers.build_sgdm(1.0, momentum=0.9))):
    process = algorithms.build_algorithm(
        'fedavg', h.MODEL_FN, alpha=0.1, local_steps=2,
        client_optimizer_fn=client, server_optimizer_fn=server)
    state = process.initialize()
    for _ in range(2):
      state = process.next(state, clients).state
    weights.append(h.trainable(process, state))
  for a, b in zip(*weights):
    np.testing.assert_array_equal(a, b)
