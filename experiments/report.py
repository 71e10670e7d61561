"""Tables and plots of comparison results (Markdown, CSV, PNG).

Results are the JSON-able dicts `experiments.compare_lib` builds from the runs'
metric files: `{'config', 'task', 'runs': [{'algorithm', 'seed', 'curve':
[[round, {'seen': summary, 'unseen': summary}], ...], 'final': ...}]}`, a
sweep `{'sweep', 'levels', 'results'}` or a grid `{'grid', 'config', 'rows'}`.
Accuracies are fractions in CSV and JSON, percentages in Markdown and plots.

matplotlib is optional (`pip install -r requirements/plots.txt`, or
`./run.sh setup plots`): without it the tables are written and the plots are
skipped with one line (`plotting_available`). Figures are drawn on
`matplotlib.figure.Figure` with an Agg canvas of their own, never through
pyplot, so writing a plot never changes the process's matplotlib backend (a
notebook kernel keeps its inline backend).
"""

from __future__ import annotations

import collections
import csv
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from perfed_tff import personalization_data
from perfed_tff.program import population_eval

POPULATIONS = tuple(population_eval.population_name(p, protocol)
                    for protocol in personalization_data.PROTOCOLS
                    for p in population_eval.POPULATIONS)
step_key = population_eval.step_key
# Display names of the algorithms in tables and plots.
LABELS = {
    'fedavg': 'FedAvg',
    'per_fedavg_fo': 'Per-FedAvg (FO)',
    'per_fedavg_hf': 'Per-FedAvg (HF)',
    'per_fedavg_maml': 'Per-FedAvg (MAML)',
}


def population_title(population: str) -> str:
  """'seen' -> 'seen users'; 'seen_paper' -> 'seen users, paper protocol'."""
  base, _, protocol = population.partition('_')
  return f'{base} users' + (f', {protocol} protocol' if protocol else '')


# --------------------------------------------------------------------------
# Tables.


def _steps(results) -> list[int]:
  return [0] + sorted(int(k) for k in results['config']['eval_steps'])


def _populations(results) -> list[str]:
  pops = results['runs'][0]['final'].keys()
  return [p for p in POPULATIONS if p in pops]


def _at(run, round_num):
  if round_num is None:
    return run['final']
  for r, summary in run['curve']:
    if r == round_num:
      return summary
  raise KeyError(f'no evaluation at round {round_num} (curve rounds: '
                 f'{[r for r, _ in run["curve"]]})')


def final_metric(results, algorithm, population, step, metric='accuracy_mean',
                 round_num: Optional[int] = None) -> np.ndarray:
  """One value per seed, at the end (or at `round_num` of the curve)."""
  return np.array([
      _at(r, round_num)[population][step_key(step)][metric]
      for r in results['runs'] if r['algorithm'] == algorithm])


def _algorithms(results) -> list[str]:
  seen = []
  for r in results['runs']:
    if r['algorithm'] not in seen:
      seen.append(r['algorithm'])
  return seen


def _fmt(values, scale=100.0) -> str:
  values = np.asarray(values, dtype=np.float64) * scale
  if values.size == 0 or np.all(np.isnan(values)):
    return 'n/a'
  std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return f'{np.mean(values):.1f} ± {std:.1f}'


SUMMARY_METRICS = ('accuracy_mean', 'accuracy_weighted', 'accuracy_p10',
                   'accuracy_p50', 'accuracy_p90', 'loss_mean')


def summary_rows(results) -> list[dict]:
  """Long table: algorithm, population, step, metric, mean, std, n_seeds."""
  rows = []
  for a in _algorithms(results):
    for pop in _populations(results):
      for k in _steps(results):
        for m in SUMMARY_METRICS:
          v = final_metric(results, a, pop, k, m)
          rows.append(dict(
              algorithm=a, population=pop, adaptation_steps=k, metric=m,
              mean=float(np.mean(v)),
              std=float(np.std(v, ddof=1)) if v.size > 1 else 0.0,
              n_seeds=int(v.size),
              values=' '.join(f'{x:.4f}' for x in v)))
  return rows


def markdown_table(results, round_num: Optional[int] = None) -> str:
  """Accuracy (%) of the client mean, mean ± std over seeds, before and after
  k steps, seen and unseen users; then weighted mean and percentiles after 1
  step."""
  steps = _steps(results)
  pops = _populations(results)
  head = ['Algorithm']
  for pop in pops:
    for k in steps:
      head.append(f'{pop}: {"global" if k == 0 else f"{k} step" + ("s" if k > 1 else "")}')
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for a in _algorithms(results):
    cells = [LABELS.get(a, a)]
    for pop in pops:
      for k in steps:
        cells.append(_fmt(final_metric(results, a, pop, k, round_num=round_num)))
    lines.append('| ' + ' | '.join(cells) + ' |')
  k1 = steps[1] if len(steps) > 1 else 0
  lines += ['', f'After {k1} step(s): example-weighted mean and per-client '
            'percentiles (10/50/90) of accuracy (%):', '']
  head = ['Algorithm']
  for pop in pops:
    head += [f'{pop}: weighted', f'{pop}: p10', f'{pop}: p50', f'{pop}: p90']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for a in _algorithms(results):
    cells = [LABELS.get(a, a)]
    for pop in pops:
      for m in ('accuracy_weighted', 'accuracy_p10', 'accuracy_p50',
                'accuracy_p90'):
        cells.append(_fmt(final_metric(results, a, pop, k1, m, round_num)))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def gains(results, baseline='fedavg', step=1,
          round_num: Optional[int] = None) -> dict:
  """Per algorithm and population: accuracy after `step` steps minus the
  baseline's after `step` steps (per seed, then mean/std), in points."""
  out = {}
  if baseline not in _algorithms(results):
    return out  # Nothing to compare against.
  for a in _algorithms(results):
    if a == baseline:
      continue
    for pop in _populations(results):
      d = 100 * (final_metric(results, a, pop, step, round_num=round_num)
                 - final_metric(results, baseline, pop, step,
                                round_num=round_num))
      out[(a, pop)] = (float(np.mean(d)),
                       float(np.std(d, ddof=1)) if d.size > 1 else 0.0, d)
  return out


# --------------------------------------------------------------------------
# Outputs.


def _gain_lines(results, round_num) -> list[str]:
  g = gains(results, round_num=round_num)
  if not g:
    return []
  lines = ['Gain over FedAvg after 1 step (points; per-seed difference, mean ± '
           'std over seeds):', '']
  for (a, pop), (m, s, d) in g.items():
    spread = f'± {s:.1f}' if d.size > 1 else '(one seed: no spread)'
    lines.append(f'- {LABELS.get(a, a)}, {pop}: {m:+.1f} {spread}')
  return lines + ['']


PLOTS_SKIPPED = ('plots skipped: matplotlib is not installed (pip install -r '
                 'requirements/plots.txt, or ./run.sh setup plots); the '
                 'tables are written')
_skip_said = False


def plotting_available() -> bool:
  """True when matplotlib can be imported; else False, after saying so once
  per process (one line on stderr), so callers write their tables and skip
  their plots."""
  global _skip_said
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if not _skip_said:
      _skip_said = True
      print(PLOTS_SKIPPED, file=sys.stderr, flush=True)
    return False
  return True


def _figure(figsize):
  """A figure with its own Agg canvas: pyplot and the process's backend are
  never touched (no `matplotlib.use`, no global figure registry)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=figsize)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def plot_curves(results, path: str, step: int = 1) -> Optional[str]:
  """Accuracy (client mean) vs round, mean ± std over seeds; solid: after
  `step` adaptation steps, dashed: the global model. None (nothing written)
  without matplotlib."""
  if not plotting_available():
    return None
  pops = _populations(results)
  fig = _figure((5.5 * len(pops), 4))
  axes = fig.subplots(1, len(pops), squeeze=False)
  for ax, pop in zip(axes[0], pops):
    for i, a in enumerate(_algorithms(results)):
      color = f'C{i}'
      runs = [r for r in results['runs'] if r['algorithm'] == a]
      rounds = np.array([c[0] for c in runs[0]['curve']])
      for k, style in ((step, '-'), (0, '--')):
        key = step_key(k)
        vals = 100 * np.array([[c[1][pop][key]['accuracy_mean']
                                for c in r['curve']] for r in runs])
        m, s = vals.mean(0), vals.std(0)
        label = f'{LABELS.get(a, a)}' + (f', {k} step' if k else ', global')
        ax.plot(rounds, m, style, color=color, label=label)
        if k:
          ax.fill_between(rounds, m - s, m + s, color=color, alpha=0.15)
    ax.set_title(population_title(pop))
    ax.set_xlabel('round')
    ax.set_ylabel('accuracy (%), client mean')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f'{results["task"]}: accuracy vs round '
               f'(mean ± std over {len(results["config"]["seeds"])} seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_bars(results, path: str) -> Optional[str]:
  """Final accuracy per algorithm: global model and after each k. None
  (nothing written) without matplotlib."""
  if not plotting_available():
    return None
  pops = _populations(results)
  steps = _steps(results)
  algs = _algorithms(results)
  fig = _figure((5.5 * len(pops), 4))
  axes = fig.subplots(1, len(pops), squeeze=False)
  width = 0.8 / len(steps)
  for ax, pop in zip(axes[0], pops):
    for j, k in enumerate(steps):
      vals = [100 * final_metric(results, a, pop, k) for a in algs]
      means = [v.mean() for v in vals]
      stds = [v.std(ddof=1) if v.size > 1 else 0.0 for v in vals]
      x = np.arange(len(algs)) + (j - (len(steps) - 1) / 2) * width
      ax.bar(x, means, width, yerr=stds, capsize=3,
             label='global model' if k == 0 else f'after {k} step(s)')
    ax.set_xticks(np.arange(len(algs)))
    ax.set_xticklabels([LABELS.get(a, a) for a in algs], rotation=15,
                       fontsize=8)
    ax.set_ylabel('accuracy (%), client mean')
    ax.set_title(population_title(pop))
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis='y', alpha=0.3)
  axes[0][0].legend(fontsize=7, loc='upper center', ncol=len(steps))
  fig.suptitle(f'{results["task"]}: final accuracy (mean ± std over seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_outputs(results, output_dir: str, prefix: str,
                  table_rounds: Sequence[int] = ()) -> dict:
  """Writes <prefix>.json/.md/.csv, <prefix>_curves.png, <prefix>_bars.png
  (the plots only with matplotlib); the Markdown also gets the table at each
  of `table_rounds` (curve points). Returns the written paths by kind."""
  os.makedirs(output_dir, exist_ok=True)
  base = os.path.join(output_dir, prefix)
  paths = {}
  with open(base + '.json', 'w') as f:
    json.dump(results, f, separators=(',', ':'))
  paths['json'] = base + '.json'
  rows = summary_rows(results)
  with open(base + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  paths['csv'] = base + '.csv'
  md = [f'## {results["task"]}', '',
        'Accuracy (%) of the client mean (each client counts once), mean ± std '
        f'over seeds {results["config"]["seeds"]}; "k steps" = k SGD steps at '
        f'alpha={results["config"]["alpha"]:g} on the user\'s train data from '
        'the global model.', '', markdown_table(results)]
  md += _gain_lines(results, None)
  for r in table_rounds:
    md += [f'### At round {r} (same runs, curve point)', '',
           markdown_table(results, round_num=r)]
    md += _gain_lines(results, r)
  if 'command' in results:
    md += ['Command:', '', '```', results['command'], '```', '']
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(md))
  paths['md'] = base + '.md'
  if plotting_available():
    paths['curves'] = plot_curves(results, base + '_curves.png')
    paths['bars'] = plot_bars(results, base + '_bars.png')
  return paths


def sweep_rows(sweep_results, baseline='fedavg', step=1) -> list[dict]:
  """Per level, algorithm and population (points, mean/std over seeds):
  accuracy of the global model and after `step` step(s); personalization
  gain = after `step` step(s) minus the *baseline's global model* (the best
  one gets without personalization); own-global gain = minus the algorithm's
  own global model; gain vs FedAvg = minus the baseline after `step`."""
  rows = []
  for label, res in zip(sweep_results['levels'], sweep_results['results']):
    for a in _algorithms(res):
      for pop in _populations(res):
        after = 100 * final_metric(res, a, pop, step)
        before = 100 * final_metric(res, a, pop, 0)
        if baseline in _algorithms(res):
          base_after = 100 * final_metric(res, baseline, pop, step)
          base_global = 100 * final_metric(res, baseline, pop, 0)
        else:  # No baseline run: its columns are n/a.
          base_after = base_global = np.full_like(after, np.nan)
        row = dict(level=label, algorithm=a, population=pop)
        for name, v in (('acc_global', before), (f'acc_{step}step', after),
                        ('personalization_gain', after - base_global),
                        ('gain_vs_own_global', after - before),
                        ('gain_vs_fedavg', after - base_after)):
          row[name + '_mean'] = float(np.mean(v))
          row[name + '_std'] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        rows.append(row)
  return rows


def plot_sweep(sweep_results, path: str, baseline='fedavg',
               step=1) -> Optional[str]:
  """Left: gain of each Per-FedAvg variant over FedAvg + `step` step(s) of
  fine-tuning; right: personalization gain of every algorithm (after `step`
  step(s) minus FedAvg's global model, i.e. no personalization); x:
  heterogeneity level; seen (solid) and unseen (dashed) users. None
  (nothing written) without matplotlib."""
  if not plotting_available():
    return None
  rows = sweep_rows(sweep_results, baseline, step)
  levels = sweep_results['levels']
  x = np.arange(len(levels))
  fig = _figure((11, 4))
  axes = fig.subplots(1, 2)
  algs = _algorithms(sweep_results['results'][0])
  for i, a in enumerate(algs):
    for pop, style in (('seen', '-o'), ('unseen', '--s')):
      sel = [r for r in rows if r['algorithm'] == a and r['population'] == pop]
      if not sel:
        continue
      name = f'{LABELS.get(a, a)}, {pop}'
      if a != baseline:
        axes[0].errorbar(x, [r['gain_vs_fedavg_mean'] for r in sel],
                         yerr=[r['gain_vs_fedavg_std'] for r in sel],
                         fmt=style, color=f'C{i}', capsize=3, label=name)
      axes[1].errorbar(x, [r['personalization_gain_mean'] for r in sel],
                       yerr=[r['personalization_gain_std'] for r in sel],
                       fmt=style, color=f'C{i}', capsize=3, label=name)
  axes[0].axhline(0, color='k', lw=0.8)
  axes[1].axhline(0, color='k', lw=0.8)
  axes[0].set_ylabel(f'after {step} step: Per-FedAvg − FedAvg (points)')
  axes[1].set_ylabel(f'after {step} step − FedAvg global model (points)')
  for ax in axes:
    ax.set_xticks(x)
    ax.set_xticklabels(levels, rotation=15, fontsize=8)
    ax.set_xlabel({
        'classes_per_user': 'classes per user (fewer = more heterogeneous)',
        'synthetic': 'Synthetic(alpha, beta) (larger = more heterogeneous)',
    }.get(sweep_results.get('sweep'), 'heterogeneity level'))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_title('Per-FedAvg gain over FedAvg + fine-tuning')
  axes[1].set_title('personalization gain over no personalization')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def write_sweep_outputs(sweep_results, output_dir: str, prefix: str) -> dict:
  os.makedirs(output_dir, exist_ok=True)
  base = os.path.join(output_dir, prefix)
  with open(base + '.json', 'w') as f:
    json.dump(sweep_results, f, separators=(',', ':'))
  rows = sweep_rows(sweep_results)
  with open(base + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ['| Level | Algorithm | Population | global | after 1 step | '
           'gain vs FedAvg global | gain vs own global | gain vs FedAvg + 1 step |',
           '|---|---|---|---|---|---|---|---|']
  pm = lambda r, k, sign='': (f'{r[k + "_mean"]:{sign}.1f} ± '
                              f'{r[k + "_std"]:.1f}')
  for r in rows:
    lines.append(
        f'| {r["level"]} | {LABELS.get(r["algorithm"], r["algorithm"])} | '
        f'{r["population"]} | {pm(r, "acc_global")} | {pm(r, "acc_1step")} | '
        f'{pm(r, "personalization_gain", "+")} | '
        f'{pm(r, "gain_vs_own_global", "+")} | {pm(r, "gain_vs_fedavg", "+")} |')
  lines = [f'Sweep over {sweep_results["sweep"]}: accuracy (%) of the client '
           'mean, mean ± std over seeds; gains in points (per-seed '
           'differences). "gain vs FedAvg global" = after 1 step minus '
           'FedAvg\'s global model (no personalization).', ''] + lines
  if 'command' in sweep_results:
    lines += ['', 'Command:', '', '```', sweep_results['command'], '```']
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  paths = {'json': base + '.json', 'csv': base + '.csv', 'md': base + '.md'}
  if plotting_available():
    paths['plot'] = plot_sweep(sweep_results, base + '.png')
  return paths


def grid_table(grid_results, step: int = 1) -> str:
  """Markdown: accuracy after `step` step(s), seen / unseen, mean over
  seeds, one row per (alpha, algorithm), one column per beta."""
  rows = grid_results['rows']
  values = collections.defaultdict(list)
  for r in rows:
    key = step_key(step)
    values[(r['alg'], r['alpha'], r['beta'])].append(
        [r['res'][p][key]['accuracy_mean'] for p in POPULATIONS
         if p in r['res']])
  algs = list(dict.fromkeys(r['alg'] for r in rows))
  alphas = sorted({r['alpha'] for r in rows})
  betas = sorted({r['beta'] for r in rows})
  lines = ['| alpha | algorithm | ' + ' | '.join(f'beta={b:g}' for b in betas)
           + ' |', '|---|---|' + '---|' * len(betas)]
  for a in alphas:
    for alg in algs:
      cells = []
      for b in betas:
        v = 100 * np.mean(np.array(values[(alg, a, b)]), axis=0)
        cells.append(' / '.join(f'{x:.1f}' for x in np.atleast_1d(v)))
      lines.append(f'| {a:g} | {LABELS.get(alg, alg)} | ' + ' | '.join(cells)
                   + ' |')
  return '\n'.join(lines) + '\n'


def write_grid_outputs(grid_results, output_dir: str, prefix: str) -> dict:
  os.makedirs(output_dir, exist_ok=True)
  base = os.path.join(output_dir, prefix)
  with open(base + '.json', 'w') as f:
    json.dump(grid_results, f, separators=(',', ':'))
  config = grid_results['config']
  md = [f'## Grid: {config["dataset"]}, {config["rounds"]} rounds, seeds '
        f'{config["seeds"]}', '',
        'Accuracy (%) after 1 step at alpha, client mean, seen / unseen '
        'users, mean over seeds.', '', grid_table(grid_results)]
  if 'command' in grid_results:
    md += ['Command:', '', '```', grid_results['command'], '```', '']
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(md))
  return {'json': base + '.json', 'md': base + '.md'}


def write_results(results: dict, output_dir: str, prefix: str,
                  table_rounds: Sequence[int] = ()) -> dict:
  """Tables and plots of any saved results (comparison, sweep or grid)."""
  if 'grid' in results:
    return write_grid_outputs(results, output_dir, prefix)
  if 'sweep' in results:
    return write_sweep_outputs(results, output_dir, prefix)
  return write_outputs(results, output_dir, prefix, table_rounds)
