"""Writes the weights after one training round of every algorithm, as the
training program computes them, to an .npz file (the reference of
tests/core/test_data_worker_datasets.py).

  python -m tests.reference.make_one_round_reference OUT.npz

The stored `one_round_bc8d04e.npz` was written at commit bc8d04e, before
the worker-side batch pipeline: each client's tf.data.Dataset was built in
Python and sent to the worker; its floats are this machine's (another
processor's instruction set can change the last bits, so the test compares
with a tolerance).
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
  from perfed_tff.program import settings as settings_lib  # pylint: disable=g-import-not-at-top
  return settings_lib.validate(settings_lib.TrainingConfig(
      algorithm=algorithm, dataset=dataset, dataset_options=options or {},
      cache_dir=None if dataset == 'digits' else cache_dir,
      clients_per_round=3, local_steps=2, batch_size=3, alpha=0.05,
      beta=0.1, delta=1e-3, rounds=1, seed=3, eval_every=0,
      root_output_dir=tempfile.mkdtemp()))


def one_round_weights(config):
  from perfed_tff.program import processes  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import round_data  # pylint: disable=g-import-not-at-top
  task = round_data.load_task(config)
  process = processes.build_process(config, task)
  state = process.initialize()
  data = round_data.round_client_data(config, task, 1)[1]
  state = process.next(state, data).state
  return [np.asarray(w) for w in process.get_model_weights(state).trainable]


def write_fixtures(cache_dir):
  from tests import data_fixtures  # pylint: disable=g-import-not-at-top
  data_fixtures.write_emnist(cache_dir)
  data_fixtures.write_shakespeare(cache_dir)


def main(path):
  """In TFF's default context."""
  cache_dir = tempfile.mkdtemp()
  write_fixtures(cache_dir)
  out = {}
  for dataset, options in CASES:
    for algorithm in ALGORITHMS:
      weights = one_round_weights(
          config_for(algorithm, dataset, options, cache_dir))
      for i, w in enumerate(weights):
        out[f'{dataset}/{algorithm}/{i}'] = w
  np.savez(path, **out)


if __name__ == '__main__':
  main(sys.argv[1])
