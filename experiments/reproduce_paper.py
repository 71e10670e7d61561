r"""Reproduces the paper's Table 1 (Fallah et al. 2020) in one command.

  python -m experiments.reproduce_paper --dataset=digits --seeds=0,...,9
  python -m experiments.reproduce_paper --dataset=mnist --cache_dir=~/.keras/datasets
  python -m experiments.reproduce_paper --dataset=cifar10 --cache_dir=~/.keras/datasets

Trains FedAvg, Per-FedAvg (FO) and (HF) (and MAML with --algorithms) on the
paper's split of the dataset (`perfed_tff.data.paper_split`: n = 50 users,
half with `a` images of each of classes 0-4, half with a/2 of one of 0-4 and
2a of one of 5-9), evaluates every trained model after one step at alpha
under both protocols ('heldout': the step on the user's train data, the
default; 'paper': on a batch of its test data, as the paper is quoted), and
writes table.md / table.csv / curves under --output_dir. Without
--alpha/--beta the step sizes are tuned first on --tuning_seeds (never
reported) with the same grid and budget for every algorithm, and both
framings are reported: one (alpha, beta) shared by all algorithms (the
paper's framing) and each algorithm at its own tuned pair. Rerunning the same
command resumes.

Defaults not stated in the quoted setup follow common re-implementations:
10 of the 50 users per round, tau = 4 local steps, batch 40, delta = 1e-3.

The optimizer flags are train.py's (--client_optimizer, --server_optimizer,
--server_learning_rate, --client_adam_beta_1, ...). Here beta is the client
optimizer's learning rate, given (--beta, or its other name
--client_learning_rate) or tuned on --grid_betas. --experiment_name puts
everything (tables and run folders) under --output_dir/<experiment_name>/.
"""

import dataclasses
import os
import shlex
import sys

if __name__ == '__main__':  # Not when imported (tests, notebooks).
  from experiments import startup  # pylint: disable=g-import-not-at-top
  startup.begin()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from experiments import cli
from perfed_tff import algorithms
from perfed_tff import checks

SOURCES = ('digits', 'mnist', 'cifar10', 'emnist')

flags.DEFINE_enum('dataset', 'digits', list(SOURCES),
                  "The paper's split of: scikit-learn digits (offline), "
                  "Keras MNIST (mnist.npz), Keras CIFAR-10 "
                  "(cifar-10-batches-py/) or TFF EMNIST-10 (pooled writers).")
flags.DEFINE_string('cache_dir', None,
                    'Directory with the dataset files (default: Keras '
                    '~/.keras/datasets, TFF ~/.tff).')
flags.DEFINE_string('dataset_options', '',
                    'Options of the split, key=value,... (num_users, a, '
                    'num_unseen_users, train_fraction, background).')
flags.DEFINE_list('algorithms', ['fedavg', 'per_fedavg_fo', 'per_fedavg_hf'],
                  'Algorithms (FedAvg is "FedAvg + update").')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Reported seeds.')
flags.DEFINE_list('tuning_seeds', ['100'],
                  'Seeds of the step-size tuning (not reported).')
flags.DEFINE_list('grid_alphas', ['0.01', '0.03', '0.1'], 'Tuning grid.')
flags.DEFINE_list('grid_betas', ['0.01', '0.03', '0.1'], 'Tuning grid.')
flags.DEFINE_float('alpha', None, 'Given: no tuning, one alpha for all.')
flags.DEFINE_float('beta', None, 'Given: no tuning, one beta (the client '
                   "optimizer's learning rate) for all.")
flags.DEFINE_integer('rounds', 100, 'Training rounds.')
flags.DEFINE_integer('clients_per_round', 10, 'Users per round (of 50).')
flags.DEFINE_integer('local_steps', 4, 'tau.')
flags.DEFINE_integer('batch_size', 40, 'Batch size (D, D\', D\'\').')
flags.DEFINE_float('delta', 1e-3, 'HF finite-difference radius.')
flags.DEFINE_integer('eval_every', 10, 'Rounds between curve points.')
flags.DEFINE_string('output_dir', '/tmp/perfed_tff/reproduce_paper',
                    'Tables, curves and the run folders (rerun: resume).')
flags.DEFINE_bool('progress', False, 'Progress bars.')
cli.define_training_flags(only=cli.OPTIMIZER_FLAGS + ('experiment_name',))

FLAGS = flags.FLAGS


def _floats(name, values):
  out = []
  for v in values:
    try:
      out.append(checks.positive_float(name, float(v)))
    except ValueError:
      raise checks.ArgumentError(name, f'must be numbers > 0, got {v!r}') from None
  if not out:
    raise checks.ArgumentError(name, 'must not be empty')
  return tuple(out)


def build_experiment():
  from experiments import reproduce_paper_lib  # pylint: disable=g-import-not-at-top
  beta = FLAGS.beta
  if FLAGS.client_learning_rate is not None:
    # Here beta is the client learning rate under its other name.
    if FLAGS.beta is not None:
      raise checks.ArgumentError(
          'client_learning_rate', 'and --beta both set the client learning '
          'rate (here --client_learning_rate is another name of --beta); give '
          'only one')
    beta = FLAGS.client_learning_rate
  if (FLAGS.alpha is None) != (beta is None):
    raise checks.ArgumentError(
        'alpha', 'give both --alpha and --beta (or its other name '
        '--client_learning_rate; no tuning) or neither (tuning)')
  output_dir = checks.writable_dir('output_dir', FLAGS.output_dir)
  base = cli.training_config(
      algorithm='fedavg', dataset=f'paper_{FLAGS.dataset}', seed=0,
      dataset_options=FLAGS.dataset_options, cache_dir=FLAGS.cache_dir,
      rounds=FLAGS.rounds, clients_per_round=FLAGS.clients_per_round,
      local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size,
      delta=FLAGS.delta, alpha=FLAGS.alpha or 0.01, beta=beta or 0.01,
      client_learning_rate=None, eval_every=FLAGS.eval_every, eval_clients=0,
      root_output_dir=output_dir, progress=FLAGS.progress)
  if base.experiment_name:
    # Tables and runs of this experiment go to its own folder.
    output_dir = os.path.join(output_dir, base.experiment_name)
    base = dataclasses.replace(base, root_output_dir=output_dir,
                               experiment_name='')
  seeds = checks.int_list('seeds', FLAGS.seeds, 0)
  tuning_seeds = checks.int_list('tuning_seeds', FLAGS.tuning_seeds, 0)
  if FLAGS.alpha is None and set(seeds) & set(tuning_seeds):
    raise checks.ArgumentError(
        'tuning_seeds', f'must not overlap the reported --seeds, got '
        f'{sorted(set(seeds) & set(tuning_seeds))} in both')
  return reproduce_paper_lib.PaperExperiment(
      base=base, algorithms=algorithms.parse_algorithms(FLAGS.algorithms),
      seeds=seeds, tuning_seeds=tuning_seeds,
      grid_alphas=_floats('grid_alphas', FLAGS.grid_alphas),
      grid_betas=_floats('grid_betas', FLAGS.grid_betas),
      alpha=FLAGS.alpha, beta=beta), output_dir


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from experiments import reproduce_paper_lib  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import interrupts  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import launch  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import outputs  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import round_data  # pylint: disable=g-import-not-at-top
  interrupts.start()

  def work():
    experiment, output_dir = build_experiment()
    round_data.load_task(experiment.base)  # A missing file fails here, once.
    with launch.execution_context(
        experiment.base, resumable=outputs.has_checkpoint(experiment.base)):
      results = reproduce_paper_lib.run(experiment, output_dir, cli.log)
    results['command'] = ('python -m experiments.reproduce_paper '
                          + shlex.join(sys.argv[1:]))
    return reproduce_paper_lib.write_outputs(results, output_dir)

  paths = cli.guard(work, 'Rerun the same command to resume.')
  with open(paths['md']) as f:
    print(f.read())
  print(f'wrote {sorted(paths.values())}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
