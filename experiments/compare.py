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

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from perfed_tff import algorithms as algorithms_lib  # pylint: disable=g-import-not-at-top
from perfed_tff import comparison  # pylint: disable=g-import-not-at-top
from perfed_tff import execution  # pylint: disable=g-import-not-at-top


def _ints(text):
  return tuple(int(v) for v in text.split(',') if v.strip())


def _floats(text):
  return tuple(float(v) for v in text.split(',') if v.strip())


def _adapt_batch(text):
  return None if text in ('full', 'none', 'None', '0') else int(text)


def parse_args(argv=None):
  d = comparison.CompareConfig()
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', default=d.dataset,
                 choices=['digits', 'synthetic', 'emnist', 'shakespeare'])
  p.add_argument('--num_users', type=int, default=d.num_users)
  p.add_argument('--num_unseen_users', type=int, default=d.num_unseen_users)
  p.add_argument('--classes_per_user', type=int, default=d.classes_per_user)
  p.add_argument('--train_fraction', type=float, default=d.train_fraction)
  p.add_argument('--synthetic_alpha', type=float, default=d.synthetic_alpha)
  p.add_argument('--synthetic_beta', type=float, default=d.synthetic_beta)
  p.add_argument('--cache_dir', default=None,
                 help='TFF cache dir with emnist_all.sqlite / shakespeare.sqlite')
  p.add_argument('--model', default=None,
                 help="registry model name (digits: mlp|linear; emnist: cnn|mlp)")
  p.add_argument('--algorithms', default=','.join(algorithms_lib.ALGORITHMS))
  p.add_argument('--seeds', type=_ints, default=tuple(d.seeds))
  p.add_argument('--rounds', type=int, default=d.rounds)
  p.add_argument('--clients_per_round', type=int, default=d.clients_per_round)
  p.add_argument('--local_steps', type=int, default=d.local_steps)
  p.add_argument('--batch_size', type=int, default=d.batch_size)
  p.add_argument('--alpha', type=float, default=d.alpha)
  p.add_argument('--beta', type=float, default=d.beta)
  p.add_argument('--delta', type=float, default=d.delta)
  p.add_argument('--client_weighting', default=d.client_weighting,
                 choices=['uniform', 'num_examples'])
  p.add_argument('--eval_steps', type=_ints, default=tuple(d.eval_steps))
  p.add_argument('--adapt_batch_size', type=_adapt_batch,
                 default=d.adapt_batch_size,
                 help="batch of each adaptation step; 'full' = all train data")
  p.add_argument('--eval_every', type=int, default=d.eval_every)
  p.add_argument('--max_eval_clients', type=int, default=None)
  p.add_argument('--sweep', default='none',
                 choices=['none', 'synthetic', 'classes_per_user', 'grid'])
  p.add_argument('--grid_alphas', type=_floats, default=(0.02, 0.05, 0.1),
                 help='--sweep=grid: alphas (use tuning seeds)')
  p.add_argument('--grid_betas', type=_floats, default=(0.02, 0.05, 0.1),
                 help='--sweep=grid: betas')
  p.add_argument('--sweep_levels', default=None,
                 help="synthetic: 'a,b;a,b;...'; classes_per_user: '1,2,5,10'")
  p.add_argument('--table_rounds', type=_ints, default=(),
                 help='also tabulate these rounds (must be curve points)')
  p.add_argument('--replot', default=None,
                 help='rewrite tables/plots from a saved results JSON; no training')
  p.add_argument('--output_dir', default='docs/results')
  p.add_argument('--prefix', default=None, help='output file prefix')
  return p.parse_args(argv)


def config_from_args(args) -> comparison.CompareConfig:
  return comparison.CompareConfig(
      dataset=args.dataset, num_users=args.num_users,
      num_unseen_users=args.num_unseen_users,
      classes_per_user=args.classes_per_user,
      train_fraction=args.train_fraction,
      synthetic_alpha=args.synthetic_alpha, synthetic_beta=args.synthetic_beta,
      cache_dir=args.cache_dir, model=args.model,
      algorithms=tuple(a for a in args.algorithms.split(',') if a),
      seeds=args.seeds, rounds=args.rounds,
      clients_per_round=args.clients_per_round, local_steps=args.local_steps,
      batch_size=args.batch_size, alpha=args.alpha, beta=args.beta,
      delta=args.delta, client_weighting=args.client_weighting,
      eval_steps=args.eval_steps, adapt_batch_size=args.adapt_batch_size,
      eval_every=args.eval_every, max_eval_clients=args.max_eval_clients)


def _command(argv):
  args = sys.argv[1:] if argv is None else list(argv)
  return ' '.join(['python', 'experiments/compare.py'] + args)


def main(argv=None, own_context: bool = True):
  """Runs the comparison or sweep; `own_context=False` uses the TFF context
  already installed (e.g. by the test session) instead of starting one."""
  args = parse_args(argv)
  config = config_from_args(args)
  start = time.perf_counter()
  if args.replot:
    with open(args.replot) as f:
      results = json.load(f)
    prefix = args.prefix or os.path.splitext(os.path.basename(args.replot))[0]
    if 'grid' in results:
      paths = comparison.write_grid_outputs(results, args.output_dir, prefix)
    elif 'sweep' in results:
      paths = comparison.write_sweep_outputs(results, args.output_dir, prefix)
    else:
      paths = comparison.write_outputs(results, args.output_dir, prefix,
                                       args.table_rounds)
    print(open(paths['md']).read())
    return paths
  context = (execution.ExecutionContext() if own_context
             else contextlib.nullcontext())
  with context:
    if args.sweep == 'none':
      prefix = args.prefix or (
          f'{config.dataset}_{config.classes_per_user}cpu'
          if config.dataset == 'digits' else
          f'synthetic_{config.synthetic_alpha:g}_{config.synthetic_beta:g}'
          if config.dataset == 'synthetic' else config.dataset)
      results = comparison.run_comparison(config)
      results['command'] = _command(argv)
      results['wall_seconds'] = time.perf_counter() - start
      paths = comparison.write_outputs(results, args.output_dir, prefix,
                                       args.table_rounds)
      print(open(paths['md']).read())
    elif args.sweep == 'grid':
      prefix = args.prefix or f'grid_{config.dataset}_{config.rounds}rounds'
      results = comparison.run_grid(config, args.grid_alphas, args.grid_betas)
      results['command'] = _command(argv)
      results['wall_seconds'] = time.perf_counter() - start
      paths = comparison.write_grid_outputs(results, args.output_dir, prefix)
      print(open(paths['md']).read())
    else:
      default = ('0,0;0.25,0.25;0.5,0.5;1,1' if args.sweep == 'synthetic'
                 else '1,2,3,5,10')
      levels = comparison.parse_levels(args.sweep, args.sweep_levels or default)
      prefix = args.prefix or f'sweep_{args.sweep}'
      results = comparison.run_sweep(config, args.sweep, levels)
      results['command'] = _command(argv)
      results['wall_seconds'] = time.perf_counter() - start
      paths = comparison.write_sweep_outputs(results, args.output_dir, prefix)
      print(open(paths['md']).read())
  print(f'wrote {sorted(paths.values())} in '
        f'{time.perf_counter() - start:.0f}s')
  return paths


if __name__ == '__main__':
  main()
