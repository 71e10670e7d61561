r"""Trains Per-FedAvg (or FedAvg) with checkpoints, exact resume and metrics.

  python experiments/train.py --algorithm=per_fedavg_hf --compare_fedavg \
      --dataset=synthetic --rounds=30 --clients_per_round=10 \
      --root_output_dir=/tmp/perfed_tff_demo

Rerunning the same command resumes from the latest checkpoint under
--root_output_dir/<algorithm>/. With --workers=host:port,... each round's
clients run on TFF workers started by `python -m perfed_tff.worker --port=N`.
All logic lives in `perfed_tff.training_program`; exit status 2 means a bad
flag (or an unusable checkpoint), 1 a failed run.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from perfed_tff import algorithms  # pylint: disable=g-import-not-at-top
from perfed_tff import flags_validation
from perfed_tff import training_program as tp

_D = tp.TrainingConfig()

flags.DEFINE_string('algorithm', _D.algorithm,
                    f'One of {list(algorithms.ALGORITHMS)}.')
flags.DEFINE_string('dataset', _D.dataset,
                    f'One of {list(flags_validation.dataset_names())}.')
flags.DEFINE_string('dataset_options', '',
                    'Dataset loader options, key=value,... (e.g. '
                    'num_users=30 for synthetic).')
flags.DEFINE_string('cache_dir', None,
                    'Existing directory with the TFF dataset files '
                    '(emnist_all.sqlite, shakespeare.sqlite).')
flags.DEFINE_integer('rounds', _D.rounds, 'Total training rounds, >= 1.')
flags.DEFINE_integer('clients_per_round', _D.clients_per_round,
                     'Clients sampled per round, 1..population.')
flags.DEFINE_float('alpha', _D.alpha, 'Inner (personalization) step, > 0.')
flags.DEFINE_float('beta', _D.beta, 'Outer (meta) step, > 0.')
flags.DEFINE_float('delta', _D.delta, 'HF finite-difference radius, > 0.')
flags.DEFINE_integer('local_steps', _D.local_steps,
                     'Local steps per round (tau), >= 1.')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Client batch size, >= 1.')
flags.DEFINE_string('client_weighting', _D.client_weighting,
                    "'uniform' (the paper) or 'num_examples'.")
flags.DEFINE_integer('seed', _D.seed,
                     'Seed of data, client sampling and shuffling, >= 0.')
flags.DEFINE_string('root_output_dir', _D.root_output_dir,
                    'Writable directory; outputs go to <dir>/<algorithm>/.')
flags.DEFINE_integer('checkpoint_every', _D.checkpoint_every,
                     'Checkpoint every N rounds (and at the end), >= 1.')
flags.DEFINE_integer('keep_checkpoints', _D.keep_checkpoints,
                     'Latest checkpoints kept, >= 1.')
flags.DEFINE_integer('eval_every', _D.eval_every,
                     'Personalized evaluation every N rounds and at the end; '
                     '0 disables it.')
flags.DEFINE_integer('eval_clients', _D.eval_clients,
                     'Clients evaluated per population; 0: all.')
flags.DEFINE_bool('compare_fedavg', _D.compare_fedavg,
                  'Also train FedAvg with the same settings and print a '
                  'side-by-side summary.')
flags.DEFINE_string('workers', '',
                    'host:port,... of TFF workers (python -m '
                    'perfed_tff.worker); empty: one local worker.')
flags.DEFINE_float('worker_timeout', _D.worker_timeout,
                   'Seconds to wait for an unreachable worker, > 0.')
flags.DEFINE_enum('graph_optimization', _D.graph_optimization,
                  ['auto', 'runtime', 'tff'],
                  'Where Grappler optimizes the TFF graphs: in the worker '
                  '(runtime), TFF\'s static pass (tff), or auto (runtime for '
                  'convolutional models on a local CPU worker, else tff).')
flags.DEFINE_bool('progress', _D.progress,
                  'Progress bar; --noprogress logs one line per round.')

FLAGS = flags.FLAGS


def _fail(message: str, status: int):
  print(f'train.py: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], flags_validation.EXIT_USAGE)


def _log(line: str) -> None:
  print(f'{time.strftime("%H:%M:%S")} {line}', file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}', flags_validation.EXIT_USAGE)
  # Our own lines go through _log; TF/TFF's INFO chatter is hidden.
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel('WARNING')
  try:
    config = tp.TrainingConfig(
        algorithm=FLAGS.algorithm, dataset=FLAGS.dataset,
        dataset_options=flags_validation.parse_options(
            'dataset_options', FLAGS.dataset_options),
        cache_dir=FLAGS.cache_dir, rounds=FLAGS.rounds,
        clients_per_round=FLAGS.clients_per_round, alpha=FLAGS.alpha,
        beta=FLAGS.beta, delta=FLAGS.delta, local_steps=FLAGS.local_steps,
        batch_size=FLAGS.batch_size, client_weighting=FLAGS.client_weighting,
        seed=FLAGS.seed, root_output_dir=FLAGS.root_output_dir,
        checkpoint_every=FLAGS.checkpoint_every,
        keep_checkpoints=FLAGS.keep_checkpoints, eval_every=FLAGS.eval_every,
        eval_clients=FLAGS.eval_clients, compare_fedavg=FLAGS.compare_fedavg,
        workers=FLAGS.workers, worker_timeout=FLAGS.worker_timeout,
        graph_optimization=FLAGS.graph_optimization,
        progress=FLAGS.progress)
    results = tp.run(config, write=_log)
  except (tp.UsageError, tp.CheckpointError) as e:
    _fail(str(e), flags_validation.EXIT_USAGE)
  except (tp.NonFiniteLossError, tp.WorkerUnavailableError) as e:
    _fail(f'{e} Rerun the same command to resume from the last checkpoint.'
          if isinstance(e, tp.WorkerUnavailableError) else str(e), 1)
  except KeyboardInterrupt:
    _fail('interrupted; rerun the same command to resume from the last '
          'checkpoint.', 130)
  for result in results:
    print(tp.format_summary(result), flush=True)
  if len(results) > 1:
    print(tp.format_comparison(results), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
