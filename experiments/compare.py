r"""FedAvg vs Per-FedAvg (FO, HF, MAML): same data, model, budget and seeds.

A comparison is a set of runs of the training loop (the same one
`experiments/train.py` runs), one per algorithm and seed, in a run directory
named from the settings under --root_output_dir (and --experiment_name, when
given; or --run_dir), so rerunning the same command resumes a stopped
comparison. Every algorithm trains with the same optimizer flags
(--client_optimizer, --server_optimizer, ...; see train.py). It writes the
results table (Markdown and CSV), accuracy-vs-round curves and a bar chart
(PNG) and the raw JSON there, and also into --output_dir when given:

  python -m experiments.compare --dataset=digits \
      --dataset_options=num_users=50,classes_per_user=2,num_unseen_users=10 \
      --seeds=0,1,2 --rounds=100

Heterogeneity sweep (one comparison per set of dataset options):

  python -m experiments.compare --algorithms=fedavg,per_fedavg_hf \
      --dataset=synthetic --sweep_levels='model_heterogeneity=0,input_heterogeneity=0;model_heterogeneity=1,input_heterogeneity=1'

Hyperparameter grid (alpha x beta for every algorithm; use tuning seeds that
are not the reported ones):

  python -m experiments.compare --seeds=100,101 --rounds=20 \
      --grid_alphas=0.02,0.05,0.1 --grid_betas=0.02,0.05,0.1

Tables and plots can be rewritten from a saved JSON with --replot=PATH.
"""

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

cli.define_training_flags(exclude=('algorithm', 'seed'))
flags.DEFINE_list('algorithms', list(algorithms.ALGORITHMS),
                  'Algorithms to compare.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (ints >= 0).')
flags.DEFINE_string('step_sizes', '',
                    "Per-algorithm step sizes, 'algorithm:alpha=A,beta=B;...' "
                    "(others use --alpha/--beta), e.g. 'fedavg:alpha=0.1;"
                    "per_fedavg_hf:alpha=0.02,beta=0.05'. beta is the client "
                    'learning rate: not with --client_learning_rate.')
flags.DEFINE_string('sweep_levels', None,
                    "Heterogeneity sweep: dataset options per level, "
                    "'k=v,k=v;k=v,...' (e.g. 'classes_per_user=1;"
                    "classes_per_user=5').")
flags.DEFINE_list('grid_alphas', [], 'Grid: alphas (use tuning seeds).')
flags.DEFINE_list('grid_betas', [], 'Grid: betas, the client learning '
                  'rates (use tuning seeds; not with --client_learning_rate).')
flags.DEFINE_list('table_rounds', [],
                  'Also tabulate these rounds (must be evaluation rounds).')
flags.DEFINE_string('run_dir', None,
                    'Run directory (default: <root_output_dir>/'
                    '[<experiment_name>/]<a name made from the settings>).')
flags.DEFINE_string('output_dir', None,
                    'Also copy the tables, plots and JSON here (e.g. '
                    'docs/results); default: only the run directory.')
flags.DEFINE_string('prefix', None, 'Output file prefix (default: the run '
                    "directory's name).")
flags.DEFINE_string('replot', None,
                    'Rewrite tables/plots from a saved results JSON; no '
                    'training.')

FLAGS = flags.FLAGS


def _floats(name, values):
  return tuple(checks.positive_float(name, _number(name, v)) for v in values)


def _number(name, value):
  try:
    return float(value)
  except ValueError:
    raise checks.ArgumentError(name, f'must be numbers, got {value!r}') from None


def parse_step_sizes(text: str, names) -> dict:
  """'alg:alpha=A,beta=B;...' -> {alg: {'alpha': A, 'beta': B}}."""
  out = {}
  for part in text.split(';'):
    if not part.strip():
      continue
    name, sep, values = part.partition(':')
    name = name.strip()
    if not sep or name not in names:
      raise checks.ArgumentError('step_sizes', f'must be algorithm:alpha=A,'
                                 f'beta=B;... for algorithms in {list(names)}'
                                 f', got {part!r}')
    sizes = checks.key_values('step_sizes', values)
    if not sizes or set(sizes) - {'alpha', 'beta'}:
      raise checks.ArgumentError('step_sizes', f'sets only alpha and beta, '
                                 f'got {part!r}')
    out[name] = {k: checks.positive_float('step_sizes', v)
                 for k, v in sizes.items()}
  return out


def build_comparison():
  from experiments import compare_lib  # pylint: disable=g-import-not-at-top
  names = algorithms.parse_algorithms(FLAGS.algorithms)
  # The settings are checked as those of a Per-FedAvg run when one is
  # compared (FedAvg keeps its own inner steps in a comparison, see
  # `processes.build_process`), else as FedAvg's.
  checked_as = next((a for a in names if a != 'fedavg'), 'fedavg')
  base = cli.training_config(algorithm=checked_as, seed=0)
  step_sizes = parse_step_sizes(FLAGS.step_sizes, names)
  if base.client_learning_rate is not None:
    with_beta = sorted(a for a, sizes in step_sizes.items() if 'beta' in sizes)
    if with_beta:
      raise checks.ArgumentError(
          'client_learning_rate', f'and the beta of --step_sizes '
          f'({", ".join(with_beta)}) both set the client learning rate (beta '
          'is its default); give only one')
  return compare_lib.Comparison(
      base=base, algorithms=names,
      seeds=checks.int_list('seeds', FLAGS.seeds, 0),
      step_sizes=step_sizes)


def _command() -> str:
  return 'python -m experiments.compare ' + shlex.join(sys.argv[1:])


def run() -> dict:
  """Runs (or resumes) what the flags ask for; returns the written paths."""
  from experiments import compare_lib  # pylint: disable=g-import-not-at-top
  from experiments import report  # pylint: disable=g-import-not-at-top
  table_rounds = (checks.int_list('table_rounds', FLAGS.table_rounds, 0)
                  if FLAGS.table_rounds else ())
  if FLAGS.replot:
    results = compare_lib.read_results(FLAGS.replot, 'replot')
    if table_rounds and 'runs' in results:
      compare_lib.check_table_rounds(
          table_rounds, compare_lib.curve_rounds(results), FLAGS.replot,
          'choose among them')
    prefix = FLAGS.prefix or os.path.splitext(os.path.basename(FLAGS.replot))[0]
    out = FLAGS.output_dir or os.path.dirname(os.path.abspath(FLAGS.replot))
    if FLAGS.output_dir:
      checks.writable_dir('output_dir', FLAGS.output_dir)
    return report.write_results(results, out, prefix, table_rounds)
  spec = build_comparison()
  grid = bool(FLAGS.grid_alphas or FLAGS.grid_betas)
  if grid and FLAGS.sweep_levels:
    raise checks.ArgumentError('sweep_levels', 'cannot be combined with a '
                               'grid (--grid_alphas/--grid_betas)')
  if FLAGS.grid_betas and spec.base.client_learning_rate is not None:
    raise checks.ArgumentError(
        'client_learning_rate', 'and --grid_betas both set the client '
        'learning rate (beta is its default); give only one')
  alphas = _floats('grid_alphas', FLAGS.grid_alphas or [spec.base.alpha])
  betas = _floats('grid_betas', FLAGS.grid_betas or [spec.base.beta])
  levels = (compare_lib.parse_levels(FLAGS.sweep_levels)
            if FLAGS.sweep_levels else None)
  kind = 'grid' if grid else 'sweep' if levels else 'compare'
  if table_rounds and kind == 'compare':
    # Before any training: the tables at these rounds need their curve points.
    compare_lib.check_table_rounds(
        table_rounds, compare_lib.evaluation_rounds(spec.base),
        f'this comparison (--rounds={spec.base.rounds}, '
        f'--eval_every={spec.base.eval_every})',
        'choose among them or change --eval_every')
  if FLAGS.run_dir and spec.base.experiment_name:
    raise checks.ArgumentError(
        'experiment_name', 'places the comparison under <root_output_dir>/'
        '<experiment_name>/; --run_dir names its folder itself: give only '
        'one')
  # The runs go to <root_output_dir>/<experiment_name>/<name>/runs/...
  run_dir = (os.path.abspath(FLAGS.run_dir) if FLAGS.run_dir else
             os.path.join(spec.base.root_output_dir,
                          spec.base.experiment_name,
                          compare_lib.default_name(spec, kind)))
  if FLAGS.run_dir:
    checks.writable_dir('run_dir', run_dir)
  prefix = FLAGS.prefix or os.path.basename(run_dir)
  cli.log(f'run directory: {run_dir} (rerun the same command to resume)')

  from perfed_tff.program import launch  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import outputs  # pylint: disable=g-import-not-at-top
  with outputs.OutputDirLock(spec.base.root_output_dir), \
      launch.execution_context(
          spec.base, resumable=compare_lib.has_checkpoints(run_dir)):
    if grid:
      def on_cell(partial):
        partial['command'] = _command()
        report.write_results(partial, run_dir, prefix)
      results = compare_lib.run_grid(spec, alphas, betas, run_dir, cli.log,
                                    on_cell=on_cell)
    elif levels:
      results = compare_lib.run_sweep(spec, levels, run_dir, cli.log)
    else:
      results = compare_lib.run_comparison(spec, run_dir, cli.log)
  results['command'] = _command()
  paths = report.write_results(results, run_dir, prefix, table_rounds)
  if FLAGS.output_dir:
    checks.writable_dir('output_dir', FLAGS.output_dir)
    paths = report.write_results(results, FLAGS.output_dir, prefix,
                                 table_rounds)
  return paths


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from perfed_tff.program import interrupts  # pylint: disable=g-import-not-at-top
  interrupts.start()
  paths = cli.guard(run, 'Rerun the same command to resume.')
  with open(paths['md']) as f:
    print(f.read())
  print(f'wrote {sorted(paths.values())}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
