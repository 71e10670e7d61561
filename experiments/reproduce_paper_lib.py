"""The paper's Table 1 (Fallah et al. 2020, Section 5) on the paper's split.

Steps (every training run is a run of the one training loop, in a folder
keyed by its step sizes and seed, so reruns resume and identical runs are
never trained twice):

1. Tuning (unless alpha and beta are given): every algorithm at every
   (alpha, beta) of one grid, the same rounds, on the tuning seeds only
   (never reported). Score: seen users' accuracy after one step at alpha on
   their train data (the leak-free 'heldout' protocol), mean over tuning
   seeds.
2. Reported runs on the reported seeds, in two framings of the step sizes:
   * 'shared': one (alpha, beta) for every algorithm, as the paper frames it
     (given, or the grid pair with the best score averaged over algorithms);
   * 'tuned': each algorithm at its own best (alpha, beta).
3. Each trained model is evaluated under both protocols: 'heldout' (the step
   on the user's train data, test on its held-out data; the default) and
   'paper' (the step on a batch of the user's test data, as the paper is
   quoted), after k = 1 step at that algorithm's alpha.

Outputs: `table.csv` (columns algorithm, dataset, protocol, framing,
population, alpha, beta, adaptation_steps, mean, std, n_seeds, values;
accuracies as fractions), `table.md` (Table-1 shaped: rows = algorithms,
cells = mean ± std in %), `curves_<framing>.png` and `results.json`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from experiments import compare_lib
from experiments import report
from experiments.report import LABELS
from perfed_tff import algorithms
from perfed_tff import personalization_data
from perfed_tff.program import population_eval
from perfed_tff.program import settings as settings_lib

PROTOCOLS = personalization_data.PROTOCOLS
FRAMINGS = ('shared', 'tuned')
PROTOCOL_TEXT = {
    'heldout': 'step on the user\'s train data, test on its held-out data',
    'paper': 'step on a batch of the user\'s test data (the paper, as quoted)',
}


@dataclasses.dataclass(frozen=True)
class PaperExperiment:
  base: settings_lib.TrainingConfig        # dataset, budget (algorithm/seed unused)
  algorithms: Sequence[str]
  seeds: Sequence[int]                    # reported
  tuning_seeds: Sequence[int]
  grid_alphas: Sequence[float]
  grid_betas: Sequence[float]
  alpha: Optional[float] = None           # given: no tuning
  beta: Optional[float] = None


def _runs(base, algorithms, seeds, step_sizes: Mapping[str, tuple],
          run_dir: str, write) -> list[dict]:
  """Runs each algorithm at its (alpha, beta) for every seed; runs with the
  same step sizes share a folder `<run_dir>/alpha_<a>_beta_<b>/`."""
  groups = collections.defaultdict(list)
  for a in algorithms:
    groups[step_sizes[a]].append(a)
  runs = []
  for (alpha, beta), algs in groups.items():
    spec = compare_lib.Comparison(
        base=dataclasses.replace(base, alpha=alpha, beta=beta),
        algorithms=tuple(algs), seeds=tuple(seeds))
    res = compare_lib.run_comparison(
        spec, os.path.join(run_dir, f'alpha_{alpha:g}_beta_{beta:g}'), write)
    runs += res['runs']
  order = {a: i for i, a in enumerate(algorithms)}
  return sorted(runs, key=lambda r: (r['seed'], order[r['algorithm']]))


def _score(run) -> float:
  return run['final']['seen']['step_1']['accuracy_mean']


def tune(exp: PaperExperiment, run_dir: str, write) -> dict:
  """Grid scores on the tuning seeds -> {'scores': {alg: {(a, b): score}},
  'tuned': {alg: (a, b)}, 'shared': (a, b)}."""
  base = dataclasses.replace(exp.base, eval_every=0, eval_protocols=('heldout',))
  scores = collections.defaultdict(dict)
  for alpha in exp.grid_alphas:
    for beta in exp.grid_betas:
      sizes = {a: (alpha, beta) for a in exp.algorithms}
      runs = _runs(base, exp.algorithms, exp.tuning_seeds, sizes,
                   os.path.join(run_dir, 'tuning'), write)
      for a in exp.algorithms:
        scores[a][(alpha, beta)] = float(np.mean(
            [_score(r) for r in runs if r['algorithm'] == a]))
      write(f'tuning alpha={alpha:g} beta={beta:g}: ' + ', '.join(
          f'{a} {scores[a][(alpha, beta)]:.4f}' for a in exp.algorithms))
  tuned = {a: max(s, key=s.get) for a, s in scores.items()}
  pairs = list(scores[exp.algorithms[0]])
  shared = max(pairs, key=lambda p: np.mean([scores[a][p]
                                             for a in exp.algorithms]))
  return {'scores': {a: {f'{p[0]:g},{p[1]:g}': v for p, v in s.items()}
                     for a, s in scores.items()},
          'tuned': tuned, 'shared': shared}


def run(exp: PaperExperiment, run_dir: str,
        write: Callable[[str], None] = print) -> dict:
  """Tunes (unless alpha/beta are given), trains the reported runs in each
  framing and returns the JSON-able results."""
  tuning = None
  if exp.alpha is not None and exp.beta is not None:
    framings = {'shared': {a: (exp.alpha, exp.beta) for a in exp.algorithms}}
  else:
    tuning = tune(exp, run_dir, write)
    framings = {'shared': {a: tuple(tuning['shared'])
                           for a in exp.algorithms},
                'tuned': {a: tuple(tuning['tuned'][a])
                          for a in exp.algorithms}}
  base = dataclasses.replace(exp.base, eval_protocols=PROTOCOLS,
                             eval_steps=(1,))
  results = {'dataset': exp.base.dataset, 'config': base.to_json(),
             'algorithms': list(exp.algorithms), 'seeds': list(exp.seeds),
             'tuning_seeds': list(exp.tuning_seeds) if tuning else [],
             'grid': {'alphas': list(exp.grid_alphas),
                      'betas': list(exp.grid_betas)} if tuning else None,
             'tuning': tuning and {k: v for k, v in tuning.items()
                                   if k == 'scores'},
             'framings': {}}
  for framing, sizes in framings.items():
    runs = _runs(base, exp.algorithms, exp.seeds, sizes,
                 os.path.join(run_dir, 'reported'), write)
    results['framings'][framing] = {
        'step_sizes': {a: list(v) for a, v in sizes.items()}, 'runs': runs}
  return results


POPULATION_OF = {p: population_eval.population_name('seen', p)
                 for p in PROTOCOLS}


def table_rows(results) -> list[dict]:
  rows = []
  for framing, f in results['framings'].items():
    for protocol in PROTOCOLS:
      for population in population_eval.POPULATIONS:
        pop = population_eval.population_name(population, protocol)
        for a in results['algorithms']:
          runs = [r for r in f['runs'] if r['algorithm'] == a]
          if not runs or pop not in runs[0]['final']:
            continue
          v = np.array([r['final'][pop]['step_1']['accuracy_mean']
                        for r in runs])
          alpha, beta = f['step_sizes'][a]
          rows.append(dict(
              algorithm=a, dataset=results['dataset'], protocol=protocol,
              framing=framing, population=population, alpha=alpha, beta=beta,
              adaptation_steps=1, mean=float(np.mean(v)),
              std=float(np.std(v, ddof=1)) if v.size > 1 else 0.0,
              n_seeds=int(v.size),
              values=' '.join(f'{x:.4f}' for x in v)))
  return rows


def _cell(row) -> str:
  spread = f' ± {100 * row["std"]:.1f}' if row['n_seeds'] > 1 else ''
  return f'{100 * row["mean"]:.1f}{spread}'


def markdown(results, rows) -> str:
  c = results['config']
  lines = [f'## Table 1 on {results["dataset"]} (the paper\'s split)', '',
           f'Accuracy (%) of the seen users after one step at alpha, client '
           f'mean, mean ± std over the reported seeds {results["seeds"]}'
           + (f' (step sizes tuned on seeds {results["tuning_seeds"]}, never '
              'reported)' if results['tuning_seeds'] else '') + '.', '',
           f'Settings: {c["rounds"]} rounds, {c["clients_per_round"]} clients '
           f'per round, tau = {c["local_steps"]} local steps, batch '
           f'{c["batch_size"]}, delta = {c["delta"]:g}, dataset options '
           f'{c["dataset_options"] or "(defaults)"}.'
           + _optimizers_text(c), '']
  framings = list(results['framings'])
  head = ['Algorithm'] + [f'{p} protocol, {f} step sizes'
                          for p in PROTOCOLS for f in framings]
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for a in results['algorithms']:
    cells = [LABELS.get(a, a)]
    for p in PROTOCOLS:
      for f in framings:
        match = [r for r in rows if r['algorithm'] == a and r['protocol'] == p
                 and r['framing'] == f and r['population'] == 'seen']
        cells.append(_cell(match[0]) if match else 'n/a')
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', 'Protocols: ' + '; '.join(f'**{p}** = {t}'
                                          for p, t in PROTOCOL_TEXT.items())
            + '.', '', 'Step sizes (alpha, beta):', '']
  for f in framings:
    sizes = results['framings'][f]['step_sizes']
    lines.append(f'- {f}: ' + ', '.join(
        f'{LABELS.get(a, a)} ({v[0]:g}, {v[1]:g})' for a, v in sizes.items()))
  lines += [''] + _gain_lines(results, rows)
  if results.get('command'):
    lines += ['', 'Command:', '', '```', results['command'], '```']
  return '\n'.join(lines) + '\n'


def _optimizers_text(c) -> str:
  """' Optimizers: ...' when a run's config `c` (JSON) names optimizers
  other than the defaults (SGD at beta on the clients, SGD at 1.0 on the
  server), else ''."""
  parts, default = [], True
  for side in settings_lib.SIDES:
    name = c.get(f'{side}_optimizer', 'sgd')
    hparams = [f'{hp}={c[f"{side}_{name}_{hp}"]:g}'
               for hp in algorithms.optimizer_hparams(name)
               if c.get(f'{side}_{name}_{hp}') is not None]
    rate = ('beta' if side == 'client' else
            f'{c.get("server_learning_rate", 1.0):g}')
    default = default and name == 'sgd' and not hparams and rate in ('beta',
                                                                     '1')
    parts.append(f'{side} {name} (learning rate {", ".join([rate] + hparams)})')
  return '' if default else f' Optimizers: {", ".join(parts)}.'


def _gain_lines(results, rows) -> list[str]:
  """Per-seed paired differences against FedAvg + update."""
  if 'fedavg' not in results['algorithms']:
    return []
  out = ['Gain over FedAvg + update (points; per-seed paired difference, '
         'mean ± std):', '']
  for f, data in results['framings'].items():
    for p in PROTOCOLS:
      pop = POPULATION_OF[p]
      base = {r['seed']: r['final'][pop]['step_1']['accuracy_mean']
              for r in data['runs'] if r['algorithm'] == 'fedavg'}
      for a in results['algorithms']:
        if a == 'fedavg':
          continue
        d = np.array([100 * (r['final'][pop]['step_1']['accuracy_mean']
                             - base[r['seed']])
                      for r in data['runs'] if r['algorithm'] == a])
        spread = (f' ± {np.std(d, ddof=1):.1f}' if d.size > 1 else
                  ' (one seed)')
        out.append(f'- {f} step sizes, {p} protocol, {LABELS.get(a, a)}: '
                   f'{np.mean(d):+.1f}{spread}')
  return out


def write_outputs(results, output_dir: str) -> dict:
  os.makedirs(output_dir, exist_ok=True)
  rows = table_rows(results)
  paths = {k: os.path.join(output_dir, v) for k, v in (
      ('csv', 'table.csv'), ('md', 'table.md'), ('json', 'results.json'))}
  with open(paths['csv'], 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(paths['md'], 'w') as f:
    f.write(markdown(results, rows))
  with open(paths['json'], 'w') as f:
    json.dump(results, f, separators=(',', ':'))
  if not report.plotting_available():  # One line said; tables written.
    return paths
  for framing, data in results['framings'].items():
    as_comparison = {'config': {'seeds': results['seeds'], 'eval_steps': [1],
                                'alpha': float('nan')},
                     'task': f'{results["dataset"]}, {framing} step sizes',
                     'runs': data['runs']}
    paths[f'curves_{framing}'] = report.plot_curves(
        as_comparison, os.path.join(output_dir, f'curves_{framing}.png'))
  return paths
