"""Writes the weights after one training round of every algorithm, as the
training program computes them, to an .npz file (the reference of
tests/test_worker_datasets.py).

  python -m tests.reference.make_one_round_reference OUT.npz

The stored `one_round_bc8d04e.npz` was written at commit bc8d04e, before
the worker-side batch pipeline: each client's tf.data.Dataset was built in
Python and sent to the worker. Runs on any commit with
`perfed_tff.program.training_loop.{build_process, round_client_data}`.
"""

import sys
import tempfile

import numpy as np

# (dataset, dataset options) of the reference runs; the EMNIST and
# Shakespeare files are the tests' small offline fixtures.
CASES = (
    ('digits', dict(num_users=12, classes_per_user=2)),
    ('emnist', dict(model='mlp')),
    ('shakespeare', dict(lstm_units=16)),
)
ALGORITHMS = ('fedavg', 'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml')


def config_for(algorithm, dataset, options, cache_dir):
  from perfed_tff.program import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.validate(config_lib.TrainingConfig(
      algorithm=algorithm, dataset=dataset, dataset_options=options or {},
      cache_dir=None if dataset == 'digits' else cache_dir,
      clients_per_round=3, local_steps=2, batch_size=3, alpha=0.05,
      beta=0.1, delta=1e-3, rounds=1, seed=3, eval_every=0,
      root_output_dir=tempfile.mkdtemp()))


def one_round_weights(config):
  from perfed_tff.program import config as config_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import training_loop  # pylint: disable=g-import-not-at-top
  task = config_lib.load_task(config)
  process = training_loop.build_process(config, task)
  state = process.initialize()
  data = training_loop.round_client_data(config, task, 1)[1]
  state = process.next(state, data).state
  return [np.asarray(w) for w in process.get_model_weights(state).trainable]


def write_fixtures(cache_dir):
  from tests import data_fixtures  # pylint: disable=g-import-not-at-top
  data_fixtures.write_emnist(cache_dir)
  data_fixtures.write_shakespeare(cache_dir)


def main(path):
  from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
  cache_dir = tempfile.mkdtemp()
  write_fixtures(cache_dir)
  out = {}
  with execution.ExecutionContext():
    for dataset, options in CASES:
      for algorithm in ALGORITHMS:
        weights = one_round_weights(
            config_for(algorithm, dataset, options, cache_dir))
        for i, w in enumerate(weights):
          out[f'{dataset}/{algorithm}/{i}'] = w
  np.savez(path, **out)


if __name__ == '__main__':
  main(sys.argv[1])
