"""FedAvg vs Per-FedAvg (FO, HF, MAML) on the same data, model and budget.

`run_comparison(config)` trains every algorithm of `config.algorithms` for every
seed with

* the same task (data split and model) per seed,
* the same rounds, clients per round, local steps tau, batch size,
* the same client sampling (`task.sample_clients(client_ids, n, seed, round)`)
  and the same per-client batch seeds (`task.derive_seed(seed, round, client)`),

and evaluates every algorithm's global model (`process.get_model_weights`) with
one `perfed_tff.evaluation.build_personalized_evaluation` computation (k SGD
steps at alpha on the client's train data, then its test data) on the seen and
the unseen users. FedAvg (TFF's `build_weighted_fed_avg`) + k steps of
fine-tuning is the baseline, as in the paper.

`write_outputs` writes the results table (Markdown and CSV, mean +- std over
seeds), accuracy-versus-round curves and a bar chart (PNG). `run_sweep` repeats
a comparison over heterogeneity levels (Synthetic(a, b), or the classes per
user of the digits split) and `plot_sweep` draws the personalization gain
against heterogeneity.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from perfed_tff import algorithms as algorithms_lib
from perfed_tff import evaluation as evaluation_lib
from perfed_tff.data import registry
from perfed_tff.data import task as task_lib

POPULATIONS = ('seen', 'unseen')
IGNORE_LABEL = {'shakespeare': 0}  # padding id, not counted in accuracy
LABELS = {
    'fedavg': 'FedAvg',
    'per_fedavg_fo': 'Per-FedAvg (FO)',
    'per_fedavg_hf': 'Per-FedAvg (HF)',
    'per_fedavg_maml': 'Per-FedAvg (MAML)',
}


@dataclasses.dataclass
class CompareConfig:
  """One comparison: data, model, training budget and evaluation protocol."""
  dataset: str = 'digits'               # digits | synthetic | emnist | shakespeare
  num_users: int = 50                   # training (seen) users
  num_unseen_users: int = 10            # never sampled for training
  classes_per_user: int = 2             # digits/emnist label skew
  train_fraction: float = 0.75          # per-user train/test split
  synthetic_alpha: float = 1.0
  synthetic_beta: float = 1.0
  cache_dir: Optional[str] = None       # TFF cache (emnist/shakespeare)
  model: Optional[str] = None           # registry model name (None: default)
  algorithms: Sequence[str] = algorithms_lib.ALGORITHMS
  seeds: Sequence[int] = (0, 1, 2)
  rounds: int = 100
  clients_per_round: int = 10
  local_steps: int = 5                  # tau
  batch_size: int = 10
  alpha: float = 0.02                   # inner / personalization step
  beta: float = 0.02                    # outer step (FedAvg's client lr)
  delta: float = 1e-3
  client_weighting: str = 'uniform'
  eval_steps: Sequence[int] = (1, 5)    # k adaptation steps measured
  adapt_batch_size: Optional[int] = 10  # None: full-batch adaptation steps
  eval_every: int = 10                  # rounds between curve points
  max_eval_clients: Optional[int] = None  # cap per population (large datasets)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def heterogeneity_label(self) -> str:
    if self.dataset == 'synthetic':
      return f'Synthetic({self.synthetic_alpha:g},{self.synthetic_beta:g})'
    if self.dataset == 'digits':
      return f'{self.classes_per_user} classes/user'
    return self.dataset


# --------------------------------------------------------------------------
# Tasks.


def load_task(config: CompareConfig, seed: int) -> task_lib.FederatedTask:
  """The task of `config` for `seed` (the split depends on the seed), from
  `perfed_tff.data.registry`; options a dataset does not take are dropped
  (e.g. emnist/shakespeare use their natural split: no num_users)."""
  options = {
      'num_users': config.num_users,
      'classes_per_user': config.classes_per_user,
      'num_unseen_users': config.num_unseen_users,
      'num_unseen_clients': config.num_unseen_users,  # emnist, shakespeare
      'train_fraction': config.train_fraction,
      'alpha': config.synthetic_alpha, 'beta': config.synthetic_beta,
  }
  if config.model is not None:
    options['model'] = config.model
  accepted = registry.dataset_options(config.dataset)
  kwargs = {k: v for k, v in options.items() if k in accepted}
  return registry.load_task(config.dataset, cache_dir=config.cache_dir,
                            seed=seed, **kwargs)


# --------------------------------------------------------------------------
# Training and evaluation.


def training_client_data(task: task_lib.FederatedTask, algorithm: str,
                         config: CompareConfig, seed: int, round_num: int):
  """(client ids, batch streams) of one training round: the same clients and
  batch seeds for every algorithm; only `task.train` is ever read."""
  return task_lib.round_client_data(
      task, clients_per_round=config.clients_per_round,
      num_batches=algorithms_lib.batches_per_round(algorithm,
                                                   config.local_steps),
      batch_size=config.batch_size, seed=seed, round_num=round_num)


def _eval_client_ids(client_ids, config: CompareConfig, seed: int, name: str):
  ids = list(client_ids)
  if config.max_eval_clients is None or len(ids) <= config.max_eval_clients:
    return ids
  rng = np.random.default_rng(task_lib.derive_seed(seed, 'eval', name))
  return sorted(rng.choice(ids, config.max_eval_clients, replace=False).tolist())


def evaluate(evaluation, weights, task, config: CompareConfig, seed: int
             ) -> dict:
  """{'seen': summary, 'unseen': summary} of the global `weights`."""
  seen_ids = _eval_client_ids(task.test.client_ids, config, seed, 'seen')
  unseen_ids = (None if task.unseen is None else
                _eval_client_ids(task.unseen[1].client_ids, config, seed,
                                 'unseen'))
  results = evaluation_lib.evaluate_task(
      evaluation, weights, task, adapt_batch_size=config.adapt_batch_size,
      seed=seed, seen_client_ids=seen_ids, unseen_client_ids=unseen_ids)
  return {pop: r.summary() for pop, r in results.items()}


@dataclasses.dataclass
class RunResult:
  algorithm: str
  seed: int
  curve: list          # [(round, {'seen': summary, 'unseen': summary})]
  final: dict          # {'seen': summary, 'unseen': summary}
  train_seconds: float
  eval_seconds: float
  sampled_clients: list  # client ids per round (for audits)

  def to_dict(self):
    return dataclasses.asdict(self)


def train_and_evaluate(task: task_lib.FederatedTask, algorithm: str,
                       config: CompareConfig, seed: int, evaluation,
                       log: Callable[[str], None] = print) -> RunResult:
  """Trains `algorithm` for `config.rounds` rounds; evaluates the global model
  every `config.eval_every` rounds and at the end (both populations)."""
  process = algorithms_lib.build_algorithm(
      algorithm, task.model_fn, alpha=config.alpha, beta=config.beta,
      delta=config.delta, local_steps=config.local_steps,
      client_weighting=config.client_weighting)
  state = process.initialize()
  curve, sampled = [], []
  train_s = eval_s = 0.0

  def eval_now(round_num):
    nonlocal eval_s
    t = time.perf_counter()
    summary = evaluate(evaluation, process.get_model_weights(state), task,
                       config, seed)
    eval_s += time.perf_counter() - t
    curve.append((round_num, summary))
    return summary

  if config.eval_every:
    eval_now(0)
  for round_num in range(config.rounds):
    t = time.perf_counter()
    ids, data = training_client_data(task, algorithm, config, seed, round_num)
    sampled.append(ids)
    output = process.next(state, data)
    state = output.state
    train_s += time.perf_counter() - t
    done = round_num + 1
    if config.eval_every and (done % config.eval_every == 0
                              or done == config.rounds):
      s = eval_now(done)
      log(f'  {algorithm} seed={seed} round {done}: seen acc '
          f'{s["seen"]["step_0"]["accuracy_mean"]:.3f} -> '
          f'{s["seen"]["step_1"]["accuracy_mean"]:.3f} (1 step)')
  if not curve or curve[-1][0] != config.rounds:
    eval_now(config.rounds)
  result = RunResult(algorithm, seed, curve, curve[-1][1], train_s, eval_s,
                     sampled)
  result.model_weights = process.get_model_weights(state)  # Not serialized.
  return result


def run_comparison(config: CompareConfig, log: Callable[[str], None] = print
                   ) -> dict:
  """Runs every algorithm for every seed; returns a JSON-able dict with the
  config and every run's curve and final evaluation."""
  for a in config.algorithms:
    algorithms_lib.check_algorithm(a)
  runs = []
  for seed in config.seeds:
    tf.keras.utils.set_random_seed(seed)
    task = load_task(config, seed)
    evaluation = evaluation_lib.build_personalized_evaluation(
        task.model_fn, alpha=config.alpha,
        adaptation_steps=tuple(config.eval_steps),
        ignore_label=IGNORE_LABEL.get(config.dataset))
    for algorithm in config.algorithms:
      t = time.perf_counter()
      run = train_and_evaluate(task, algorithm, config, seed, evaluation, log)
      log(f'{algorithm} seed={seed}: {time.perf_counter() - t:.0f}s '
          f'(train {run.train_seconds:.0f}s, eval {run.eval_seconds:.0f}s)')
      runs.append(run.to_dict())
  return {'config': config.to_dict(), 'task': task.name, 'runs': runs}


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
      _at(r, round_num)[population][evaluation_lib.step_key(step)][metric]
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
  for (a, pop), (m, s, _) in g.items():
    lines.append(f'- {LABELS.get(a, a)}, {pop}: {m:+.1f} ± {s:.1f}')
  return lines + ['']


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(results, path: str, step: int = 1) -> str:
  """Accuracy (client mean) vs round, mean ± std over seeds; solid: after
  `step` adaptation steps, dashed: the global model."""
  plt = _pyplot()
  pops = _populations(results)
  fig, axes = plt.subplots(1, len(pops), figsize=(5.5 * len(pops), 4),
                           squeeze=False)
  for ax, pop in zip(axes[0], pops):
    for i, a in enumerate(_algorithms(results)):
      color = f'C{i}'
      runs = [r for r in results['runs'] if r['algorithm'] == a]
      rounds = np.array([c[0] for c in runs[0]['curve']])
      for k, style in ((step, '-'), (0, '--')):
        key = evaluation_lib.step_key(k)
        vals = 100 * np.array([[c[1][pop][key]['accuracy_mean']
                                for c in r['curve']] for r in runs])
        m, s = vals.mean(0), vals.std(0)
        label = f'{LABELS.get(a, a)}' + (f', {k} step' if k else ', global')
        ax.plot(rounds, m, style, color=color, label=label)
        if k:
          ax.fill_between(rounds, m - s, m + s, color=color, alpha=0.15)
    ax.set_title(f'{pop} users')
    ax.set_xlabel('round')
    ax.set_ylabel('accuracy (%), client mean')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f'{results["task"]}: accuracy vs round '
               f'(mean ± std over {len(results["config"]["seeds"])} seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_bars(results, path: str) -> str:
  """Final accuracy per algorithm: global model and after each k."""
  plt = _pyplot()
  pops = _populations(results)
  steps = _steps(results)
  algs = _algorithms(results)
  fig, axes = plt.subplots(1, len(pops), figsize=(5.5 * len(pops), 4),
                           squeeze=False)
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
    ax.set_title(f'{pop} users')
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis='y', alpha=0.3)
  axes[0][0].legend(fontsize=7, loc='upper center', ncol=len(steps))
  fig.suptitle(f'{results["task"]}: final accuracy (mean ± std over seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_outputs(results, output_dir: str, prefix: str,
                  table_rounds: Sequence[int] = ()) -> dict:
  """Writes <prefix>.json/.md/.csv, <prefix>_curves.png, <prefix>_bars.png;
  the Markdown also gets the table at each of `table_rounds` (curve points)."""
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
  paths['curves'] = plot_curves(results, base + '_curves.png')
  paths['bars'] = plot_bars(results, base + '_bars.png')
  return paths


# --------------------------------------------------------------------------
# Heterogeneity sweep.


def parse_levels(sweep: str, text: str) -> list:
  """'synthetic': '0,0;0.5,0.5;1,1' -> [(0,0), ...];
  'classes_per_user': '1,2,5,10' -> [1, 2, 5, 10]."""
  if sweep == 'synthetic':
    return [tuple(float(v) for v in part.split(','))
            for part in text.split(';') if part.strip()]
  if sweep == 'classes_per_user':
    return [int(v) for v in text.split(',') if v.strip()]
  raise ValueError(f'unknown sweep {sweep!r}')


def sweep_config(base: CompareConfig, sweep: str, level) -> CompareConfig:
  if sweep == 'synthetic':
    return dataclasses.replace(base, dataset='synthetic',
                               synthetic_alpha=level[0],
                               synthetic_beta=level[1])
  return dataclasses.replace(base, classes_per_user=int(level))


def run_sweep(base: CompareConfig, sweep: str, levels: Sequence,
              log: Callable[[str], None] = print) -> dict:
  """One comparison per heterogeneity level (ordered from most similar users
  to most heterogeneous is the caller's choice)."""
  out = {'sweep': sweep, 'levels': [], 'results': []}
  for level in levels:
    config = sweep_config(base, sweep, level)
    log(f'== {config.heterogeneity_label()}')
    out['levels'].append(config.heterogeneity_label())
    out['results'].append(run_comparison(config, log))
  return out


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
        base_after = 100 * final_metric(res, baseline, pop, step)
        base_global = 100 * final_metric(res, baseline, pop, 0)
        row = dict(level=label, algorithm=a, population=pop)
        for name, v in (('acc_global', before), (f'acc_{step}step', after),
                        ('personalization_gain', after - base_global),
                        ('gain_vs_own_global', after - before),
                        ('gain_vs_fedavg', after - base_after)):
          row[name + '_mean'] = float(np.mean(v))
          row[name + '_std'] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        rows.append(row)
  return rows


def plot_sweep(sweep_results, path: str, baseline='fedavg', step=1) -> str:
  """Left: gain of each Per-FedAvg variant over FedAvg + `step` step(s) of
  fine-tuning; right: personalization gain of every algorithm (after `step`
  step(s) minus FedAvg's global model, i.e. no personalization); x:
  heterogeneity level; seen (solid) and unseen (dashed) users."""
  plt = _pyplot()
  rows = sweep_rows(sweep_results, baseline, step)
  levels = sweep_results['levels']
  x = np.arange(len(levels))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
  plt.close(fig)
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
  return {'json': base + '.json', 'csv': base + '.csv', 'md': base + '.md',
          'plot': plot_sweep(sweep_results, base + '.png')}


# --------------------------------------------------------------------------
# Hyperparameter grid (run on tuning seeds, disjoint from reported seeds).


def run_grid(base: CompareConfig, alphas: Sequence[float],
             betas: Sequence[float], log: Callable[[str], None] = print
             ) -> dict:
  """Every algorithm of `base` at every (alpha, beta), for every seed of
  `base.seeds`, final evaluation only. FedAvg's training does not use alpha:
  it is trained once per beta and fine-tuned at every alpha."""
  rows = []
  for seed in base.seeds:
    task = load_task(base, seed)
    evaluations = {a: evaluation_lib.build_personalized_evaluation(
        task.model_fn, alpha=a, adaptation_steps=tuple(base.eval_steps),
        ignore_label=IGNORE_LABEL.get(base.dataset)) for a in alphas}
    for beta in betas:
      for algorithm in base.algorithms:
        if algorithm == 'fedavg':
          config = dataclasses.replace(base, alpha=alphas[0], beta=beta,
                                       eval_every=0)
          run = train_and_evaluate(task, algorithm, config, seed,
                                   evaluations[alphas[0]], log=lambda s: None)
          for a in alphas:
            res = evaluate(evaluations[a], run.model_weights, task,
                           dataclasses.replace(config, alpha=a), seed)
            rows.append(dict(alg=algorithm, alpha=a, beta=beta, seed=seed,
                             res=res))
        else:
          for a in alphas:
            config = dataclasses.replace(base, alpha=a, beta=beta,
                                         eval_every=0)
            run = train_and_evaluate(task, algorithm, config, seed,
                                     evaluations[a], log=lambda s: None)
            rows.append(dict(alg=algorithm, alpha=a, beta=beta, seed=seed,
                             res=run.final))
        log(f'grid seed={seed} beta={beta:g} {algorithm} done')
  return {'grid': True, 'config': base.to_dict(), 'rows': rows}


def grid_table(grid_results, step: int = 1) -> str:
  """Markdown: accuracy after `step` step(s), seen / unseen, mean over
  seeds, one row per (alpha, algorithm), one column per beta."""
  rows = grid_results['rows']
  values = collections.defaultdict(list)
  for r in rows:
    key = evaluation_lib.step_key(step)
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


def default_prefix(config: CompareConfig, sweep: str) -> str:
  """Output file prefix of a run: dataset and heterogeneity, sweep or grid."""
  if sweep == 'grid':
    return f'grid_{config.dataset}_{config.rounds}rounds'
  if sweep != 'none':
    return f'sweep_{sweep}'
  if config.dataset == 'digits':
    return f'{config.dataset}_{config.classes_per_user}cpu'
  if config.dataset == 'synthetic':
    return f'synthetic_{config.synthetic_alpha:g}_{config.synthetic_beta:g}'
  return config.dataset


DEFAULT_SWEEP_LEVELS = {'synthetic': '0,0;0.25,0.25;0.5,0.5;1,1',
                        'classes_per_user': '1,2,3,5,10'}


def run_experiment(config: CompareConfig, *, sweep: str = 'none',
                   sweep_levels: Optional[str] = None,
                   grid_alphas: Sequence[float] = (0.02, 0.05, 0.1),
                   grid_betas: Sequence[float] = (0.02, 0.05, 0.1),
                   output_dir: str, prefix: Optional[str] = None,
                   table_rounds: Sequence[int] = (),
                   command: str = '') -> dict:
  """Runs a comparison (`sweep='none'`), a heterogeneity sweep
  ('synthetic' | 'classes_per_user') or an alpha x beta grid ('grid') in the
  current TFF context, writes its outputs and returns their paths."""
  start = time.perf_counter()
  prefix = prefix or default_prefix(config, sweep)
  if sweep == 'none':
    results = run_comparison(config)
  elif sweep == 'grid':
    results = run_grid(config, grid_alphas, grid_betas)
  else:
    levels = parse_levels(sweep, sweep_levels or DEFAULT_SWEEP_LEVELS[sweep])
    results = run_sweep(config, sweep, levels)
  results['command'] = command
  results['wall_seconds'] = time.perf_counter() - start
  return write_results(results, output_dir, prefix, table_rounds)


def write_results(results: dict, output_dir: str, prefix: str,
                  table_rounds: Sequence[int] = ()) -> dict:
  """Tables and plots of any saved results (comparison, sweep or grid)."""
  if 'grid' in results:
    return write_grid_outputs(results, output_dir, prefix)
  if 'sweep' in results:
    return write_sweep_outputs(results, output_dir, prefix)
  return write_outputs(results, output_dir, prefix, table_rounds)
