"""FedAvg vs Per-FedAvg (FO, HF, MAML): same data, model, budget and seeds.

Comparison (results table in Markdown and CSV, accuracy-vs-round curves and a
bar chart as PNG, raw JSON):

  python experiments/compare.py --dataset=digits --classes_per_user=2 \
      --num_users=50 --seeds=0,1,2 --output_dir=docs/results

Heterogeneity sweep (personalization gain against heterogeneity):

  python experiments/compare.py --sweep=synthetic \
      --sweep_levels='0,0;0.25,0.25;0.5,0.5;1,1' --algorithms=fedavg,per_fedavg_hf
  python experiments/compare.py --sweep=classes_per_user --sweep_levels=1,2,3,5,10

Hyperparameter grid (alpha x beta for every algorithm; use tuning seeds that
are not the reported ones):

  python experiments/compare.py --sweep=grid --seeds=100,101 --rounds=20 \
      --algorithms=fedavg,per_fedavg_fo,per_fedavg_hf \
      --grid_alphas=0.02,0.05,0.1 --grid_betas=0.02,0.05,0.1

Tables and plots can be rewritten from a saved JSON with --replot=PATH.

Every TFF computation runs inside `perfed_tff.ExecutionContext`, which owns
its `worker_binary` (stopped on exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from perfed_tff import algorithms as algorithms_lib  # pylint: disable=g-import-not-at-top
from perfed_tff import comparison  # pylint: disable=g-import-not-at-top
from perfed_tff import execution  # pylint: disable=g-import-not-at-top

_D = comparison.CompareConfig()


def _csv(values):
  return ','.join(str(v) for v in values)


flags.DEFINE_enum('dataset', _D.dataset,
                  ['digits', 'synthetic', 'emnist', 'shakespeare'], 'Dataset.')
flags.DEFINE_integer('num_users', _D.num_users, 'Training (seen) users.')
flags.DEFINE_integer('num_unseen_users', _D.num_unseen_users,
                     'Users never sampled for training.')
flags.DEFINE_integer('classes_per_user', _D.classes_per_user,
                     'Label skew of the digits split.')
flags.DEFINE_float('train_fraction', _D.train_fraction,
                   'Per-user train/test split.')
flags.DEFINE_float('synthetic_alpha', _D.synthetic_alpha, 'Synthetic(alpha, .)')
flags.DEFINE_float('synthetic_beta', _D.synthetic_beta, 'Synthetic(., beta)')
flags.DEFINE_string('cache_dir', None,
                    'TFF cache dir with emnist_all.sqlite / shakespeare.sqlite.')
flags.DEFINE_string('model', None,
                    'Registry model name (digits: mlp|linear; emnist: cnn|mlp).')
flags.DEFINE_list('algorithms', list(algorithms_lib.ALGORITHMS),
                  'Algorithms to compare.')
flags.DEFINE_list('seeds', _csv(_D.seeds), 'Seeds (ints).')
flags.DEFINE_integer('rounds', _D.rounds, 'Training rounds.')
flags.DEFINE_integer('clients_per_round', _D.clients_per_round,
                     'Clients per round.')
flags.DEFINE_integer('local_steps', _D.local_steps, 'tau.')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Client batch size.')
flags.DEFINE_float('alpha', _D.alpha, 'Inner / personalization step.')
flags.DEFINE_float('beta', _D.beta, "Outer step (FedAvg's client lr).")
flags.DEFINE_float('delta', _D.delta, 'HF finite-difference radius.')
flags.DEFINE_enum('client_weighting', _D.client_weighting,
                  ['uniform', 'num_examples'], 'Server averaging weights.')
flags.DEFINE_list('eval_steps', _csv(_D.eval_steps),
                  'Adaptation steps k measured (ints).')
flags.DEFINE_string('adapt_batch_size', str(_D.adapt_batch_size),
                    "Batch of each adaptation step; 'full' = all train data.")
flags.DEFINE_integer('eval_every', _D.eval_every,
                     'Rounds between curve points; 0: only at the end.')
flags.DEFINE_integer('max_eval_clients', None, 'Cap per population.')
flags.DEFINE_enum('sweep', 'none',
                  ['none', 'synthetic', 'classes_per_user', 'grid'],
                  'Comparison, heterogeneity sweep or alpha x beta grid.')
flags.DEFINE_list('grid_alphas', '0.02,0.05,0.1',
                  '--sweep=grid: alphas (use tuning seeds).')
flags.DEFINE_list('grid_betas', '0.02,0.05,0.1', '--sweep=grid: betas.')
flags.DEFINE_string('sweep_levels', None,
                    "synthetic: 'a,b;a,b;...'; classes_per_user: '1,2,5,10'.")
flags.DEFINE_list('table_rounds', [],
                  'Also tabulate these rounds (must be curve points).')
flags.DEFINE_string('replot', None,
                    'Rewrite tables/plots from a saved results JSON; no training.')
flags.DEFINE_string('output_dir', 'docs/results', 'Output directory.')
flags.DEFINE_string('prefix', None, 'Output file prefix.')

FLAGS = flags.FLAGS


def _ints(values):
  return tuple(int(v) for v in values)


def config_from_flags() -> comparison.CompareConfig:
  adapt = FLAGS.adapt_batch_size
  return comparison.CompareConfig(
      dataset=FLAGS.dataset, num_users=FLAGS.num_users,
      num_unseen_users=FLAGS.num_unseen_users,
      classes_per_user=FLAGS.classes_per_user,
      train_fraction=FLAGS.train_fraction,
      synthetic_alpha=FLAGS.synthetic_alpha,
      synthetic_beta=FLAGS.synthetic_beta,
      cache_dir=FLAGS.cache_dir, model=FLAGS.model,
      algorithms=tuple(FLAGS.algorithms), seeds=_ints(FLAGS.seeds),
      rounds=FLAGS.rounds, clients_per_round=FLAGS.clients_per_round,
      local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size,
      alpha=FLAGS.alpha, beta=FLAGS.beta, delta=FLAGS.delta,
      client_weighting=FLAGS.client_weighting,
      eval_steps=_ints(FLAGS.eval_steps),
      adapt_batch_size=(None if adapt in ('full', 'none', 'None', '0')
                        else int(adapt)),
      eval_every=FLAGS.eval_every, max_eval_clients=FLAGS.max_eval_clients)


def _run(command: str, own_context: bool) -> dict:
  if FLAGS.replot:
    with open(FLAGS.replot) as f:
      results = json.load(f)
    prefix = FLAGS.prefix or os.path.splitext(os.path.basename(FLAGS.replot))[0]
    paths = comparison.write_results(results, FLAGS.output_dir, prefix,
                                     _ints(FLAGS.table_rounds))
  else:
    context = (execution.ExecutionContext() if own_context
               else contextlib.nullcontext())
    with context:
      paths = comparison.run_experiment(
          config_from_flags(), sweep=FLAGS.sweep,
          sweep_levels=FLAGS.sweep_levels,
          grid_alphas=tuple(float(a) for a in FLAGS.grid_alphas),
          grid_betas=tuple(float(b) for b in FLAGS.grid_betas),
          output_dir=FLAGS.output_dir, prefix=FLAGS.prefix,
          table_rounds=_ints(FLAGS.table_rounds), command=command)
  with open(paths['md']) as f:
    print(f.read())
  print(f'wrote {sorted(paths.values())}')
  return paths


def run_with_args(args, own_context: bool = True) -> dict:
  """Parses `args` (flags without the program name) and runs; for tests and
  notebooks. `own_context=False` uses the TFF context already installed."""
  FLAGS.unparse_flags()
  FLAGS(['compare.py', *args])
  return _run(' '.join(['python', 'experiments/compare.py', *args]),
              own_context)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  _run(' '.join(['python', 'experiments/compare.py', *sys.argv[1:]]), True)


if __name__ == '__main__':
  app.run(main)
