"""FedAvg vs Per-FedAvg (FO, HF, MAML) as a set of runs of the training loop.

A comparison trains every algorithm for every seed with
`perfed_tff.program.training_loop.run_training`, each run in its own folder
`<run_dir>/runs/seed_<s>/<algorithm>/` (checkpoints, metric CSVs, final
model), so

* every run uses the same task (split and model) per seed, the same rounds,
  clients per round, tau, batch size, client sampling and batch seeds: pairs
  of algorithms stay paired;
* `train.py` with the same settings and seed computes exactly the same run;
* a comparison that is stopped (even by SIGKILL) resumes where it stopped
  when rerun: finished runs are read back from their files, the interrupted
  one resumes from its checkpoint, and the tables equal an uninterrupted
  run's.

Results (curves and final evaluations) are read back from each run's
`metrics/eval.csv`; `experiments.report` turns them into tables and plots.
A heterogeneity sweep is one comparison per set of dataset options, a grid
one comparison per (alpha, beta); each finished cell is on disk and its
partial table is rewritten after every cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Mapping, Optional, Sequence

from perfed_tff.program import settings as settings_lib
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import population_eval
from perfed_tff.program import round_data
from perfed_tff.program import training_loop

_DEFAULT_CONFIG = settings_lib.TrainingConfig()


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The runs of one comparison: `base` for every `algorithms` x `seeds`
  (base.algorithm and base.seed are replaced); `step_sizes` optionally gives
  an algorithm its own {'alpha': .., 'beta': ..}."""
  base: settings_lib.TrainingConfig
  algorithms: Sequence[str]
  seeds: Sequence[int]
  step_sizes: Mapping[str, Mapping[str, float]] = dataclasses.field(
      default_factory=dict)

  def config_for(self, algorithm: str, seed: int,
                 run_dir: str) -> settings_lib.TrainingConfig:
    # A comparison always evaluates the final model (eval_every=0: only at
    # round 0 and at the end). `run_dir` already holds the experiment name.
    return dataclasses.replace(
        self.base, algorithm=algorithm, seed=seed,
        eval_every=self.base.eval_every or self.base.rounds,
        root_output_dir=os.path.join(run_dir, 'runs', f'seed_{seed}'),
        experiment_name='',
        **dict(self.step_sizes.get(algorithm, {})))

  def to_json(self) -> dict:
    out = self.base.to_json()
    for k in ('algorithm', 'seed', 'root_output_dir', 'experiment_name',
              'progress', 'workers'):
      out.pop(k, None)
    out.update(algorithms=list(self.algorithms), seeds=list(self.seeds))
    if self.step_sizes:
      out['step_sizes'] = {a: dict(v) for a, v in self.step_sizes.items()}
    return out


def default_name(comparison: Comparison, kind: str = 'compare') -> str:
  """A run-directory name that is a pure function of the settings (so a
  rerun of the same command resumes) and differs when they differ."""
  settings = comparison.to_json()
  for k in settings_lib.OPTIMIZER_FIELDS:
    # At their defaults the optimizer settings leave the name as it was
    # before they existed: such comparisons still resume.
    if settings[k] == getattr(_DEFAULT_CONFIG, k):
      del settings[k]
  settings = json.dumps(settings, sort_keys=True, default=str)
  digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
  return f'{kind}_{comparison.base.dataset}_{digest}'


def evaluation_rounds(base: settings_lib.TrainingConfig) -> list[int]:
  """The rounds at which every run of a comparison with settings `base`
  evaluates (its curve points): round 0, every `eval_every` rounds and the
  last round (`eval_every=0`: round 0 and the last; see
  `Comparison.config_for` and `tff.simulation.run_training_process`)."""
  every = base.eval_every or base.rounds
  return sorted({0, base.rounds, *range(every, base.rounds + 1, every)})


def _some_rounds(rounds: Sequence[int]) -> str:
  rounds = list(rounds)
  if len(rounds) <= 8:
    return ', '.join(map(str, rounds))
  return (', '.join(map(str, rounds[:4])) + ', ..., ' +
          ', '.join(map(str, rounds[-2:])))


def check_table_rounds(table_rounds: Sequence[int], available: Sequence[int],
                       where: str, hint: str) -> None:
  """Raises `checks.ArgumentError` (table_rounds) for a round that is not
  among `available` (the evaluation rounds of `where`)."""
  from perfed_tff import checks  # pylint: disable=g-import-not-at-top
  missing = [r for r in table_rounds if r not in set(available)]
  if missing:
    raise checks.ArgumentError(
        'table_rounds', f'{_some_rounds(missing)} '
        f'{"is not an evaluation round" if len(missing) == 1 else "are not evaluation rounds"} '
        f'of {where} (evaluated at rounds {_some_rounds(available)}); {hint}')


def read_results(path: str, name: str = 'replot') -> dict:
  """The results JSON that `experiments.compare` wrote at `path`.

  Raises:
    checks.ArgumentError (`name`): no such file, unreadable, not JSON, or
      JSON that is no comparison, sweep or grid result.
  """
  from perfed_tff import checks  # pylint: disable=g-import-not-at-top
  what = 'a results JSON file written by compare.py (<prefix>.json)'
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise checks.ArgumentError(name, f'{path} does not exist; give {what}'
                               ) from None
  except IsADirectoryError:
    raise checks.ArgumentError(name, f'{path} is a directory; give {what}'
                               ) from None
  except OSError as e:
    raise checks.ArgumentError(
        name, f'cannot read {path} ({e.strerror or e})') from None
  try:
    results = json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError:
    raise checks.ArgumentError(
        name, f'{path} is not {what}: it is not text (a binary file?)'
    ) from None
  except ValueError as e:
    raise checks.ArgumentError(
        name, f'{path} is not {what}: invalid JSON ({e})') from None
  known = isinstance(results, dict) and (
      ('grid' in results and 'rows' in results)
      or ('sweep' in results and 'results' in results)
      or ('runs' in results and 'config' in results and 'task' in results))
  if not known:
    raise checks.ArgumentError(
        name, f'{path} is JSON but not the results of a comparison, sweep or '
        f'grid; give {what}')
  return results


def curve_rounds(results: dict) -> list[int]:
  """The rounds every run of a comparison's `results` has a curve point
  at (its evaluation rounds)."""
  runs = results.get('runs') or []
  common = None
  for run in runs:
    rounds = {int(r) for r, _ in run.get('curve', [])}
    common = rounds if common is None else common & rounds
  return sorted(common or ())


def has_checkpoints(run_dir: str) -> bool:
  """Whether any run under `run_dir` (a comparison's folder) has a
  checkpoint, i.e. rerunning resumes something."""
  from perfed_tff.program import checkpointing  # pylint: disable=g-import-not-at-top
  for _, dirs, _ in os.walk(run_dir):
    if any(d.startswith(checkpointing.PREFIX) and
           d[len(checkpointing.PREFIX):].isdigit() for d in dirs):
      return True
  return False


def run_record(config: settings_lib.TrainingConfig,
               result: training_loop.TrainingResult) -> dict:
  """One run's curve and final evaluation, read back from its eval CSV."""
  eval_rows = metrics_lib.read_csv(result.paths.get('eval_csv', ''))
  curve = [[int(row['round']), population_eval.summary_at(row)]
           for row in eval_rows]
  train_rows = metrics_lib.read_csv(result.paths['train_csv'])
  return dict(
      algorithm=config.algorithm, seed=config.seed, alpha=config.alpha,
      beta=config.beta, curve=curve, final=curve[-1][1] if curve else {},
      train_seconds=sum(float(r.get(metrics_lib.ROUND_SECONDS, 0.0))
                        for r in train_rows),
      run_dir=result.output_dir)


def run_comparison(comparison: Comparison, run_dir: str,
                   write: Callable[[str], None] = print) -> dict:
  """Runs (or resumes, or reads back) every run of `comparison` in the
  current TFF context; returns the JSON-able results."""
  runs, task = [], None
  for seed in comparison.seeds:
    seed_config = dataclasses.replace(comparison.base, seed=seed)
    task = round_data.load_task(seed_config)
    evaluate_fn = None
    for algorithm in comparison.algorithms:
      config = comparison.config_for(algorithm, seed, run_dir)
      if config.eval_every and evaluate_fn is None:
        # One evaluation, shared by the algorithms (alpha is its argument).
        evaluate_fn = training_loop.build_evaluate_fn(config, task)
      result = training_loop.run_training(config, task=task,
                                          evaluate_fn=evaluate_fn,
                                          write=write)
      write(f'{algorithm} seed={seed}: done ({result.output_dir})')
      runs.append(run_record(config, result))
  return {'config': comparison.to_json(), 'task': task.name, 'runs': runs}


def parse_levels(text: str) -> list[dict]:
  """'classes_per_user=1;classes_per_user=2' -> [{'classes_per_user': 1},
  {'classes_per_user': 2}]: dataset options per sweep level."""
  from perfed_tff import checks  # pylint: disable=g-import-not-at-top
  levels = [checks.key_values('sweep_levels', part)
            for part in text.split(';') if part.strip()]
  if not levels:
    raise checks.ArgumentError('sweep_levels', 'must name at least one level')
  return levels


def level_label(options: Mapping[str, object]) -> str:
  return ','.join(f'{k}={v}' for k, v in options.items())


def run_sweep(comparison: Comparison, levels: Sequence[Mapping], run_dir: str,
              write: Callable[[str], None] = print) -> dict:
  """One comparison per level (dataset options added to the base's)."""
  out = {'sweep': 'dataset_options', 'levels': [], 'results': []}
  for i, options in enumerate(levels):
    base = dataclasses.replace(
        comparison.base,
        dataset_options=dict(comparison.base.dataset_options, **options))
    write(f'== level {level_label(options)}')
    out['levels'].append(level_label(options))
    out['results'].append(run_comparison(
        dataclasses.replace(comparison, base=base),
        os.path.join(run_dir, f'level_{i}'), write))
  return out


def run_grid(comparison: Comparison, alphas: Sequence[float],
             betas: Sequence[float], run_dir: str,
             write: Callable[[str], None] = print,
             on_cell: Optional[Callable[[dict], None]] = None) -> dict:
  """Every algorithm at every (alpha, beta), final evaluation only; after each
  cell `on_cell(partial results)` (e.g. to rewrite the table)."""
  rows = []
  results = {'grid': True, 'config': comparison.to_json(), 'rows': rows}
  for beta in betas:
    for alpha in alphas:
      base = dataclasses.replace(comparison.base, alpha=alpha, beta=beta,
                                 eval_every=0)
      cell = run_comparison(
          dataclasses.replace(comparison, base=base, step_sizes={}),
          os.path.join(run_dir, f'alpha_{alpha:g}_beta_{beta:g}'), write)
      for run in cell['runs']:
        rows.append(dict(alg=run['algorithm'], alpha=alpha, beta=beta,
                         seed=run['seed'], res=run['final']))
      write(f'grid alpha={alpha:g} beta={beta:g}: done')
      if on_cell is not None:
        on_cell(results)
  return results
