"""How a chaos soak's run compares with the uninterrupted one, and its report.

`compare_runs` compares the final weights (`final_model.npz`, exactly) and
the metric files (`metrics/*.csv`, row by row, wall-clock columns excluded)
of the chaos run with the reference's. `summarize` turns a finished (or
interrupted) `chaos_soak_lib.Soak` into the JSON report: faults by kind and
their outcomes, reaction seconds, restarts, rounds trained again, time lost,
identical or not, findings; `print_table` prints it.
"""

from __future__ import annotations

import collections
import csv
import glob
import os
import re

import numpy as np

from experiments import chaos_faults

TIME_COLUMNS = re.compile(r'(_time_in_seconds|timestamp|wall)', re.I)


def _shape(line: str) -> str:
  """An error line with its numbers, ports and paths blanked, to group the
  same message."""
  line = re.sub(r'/[^\s;)]+', '<path>', line)
  return re.sub(r'\d+(\.\d+)?', 'N', line)


def result_files(run_root: str) -> list[str]:
  """Relative paths of the final weights and metric files under `run_root`."""
  found = glob.glob(os.path.join(run_root, '**', 'final_model.npz'),
                    recursive=True)
  found += glob.glob(os.path.join(run_root, '**', 'metrics', '*.csv'),
                     recursive=True)
  return sorted(os.path.relpath(p, run_root) for p in found)


def compare_npz(a_path: str, b_path: str):
  """None when equal bit for bit, else what differs."""
  with np.load(a_path) as a, np.load(b_path) as b:
    if sorted(a.files) != sorted(b.files):
      return f'arrays {sorted(a.files)} vs {sorted(b.files)}'
    diffs = []
    for k in sorted(a.files):
      x, y = a[k], b[k]
      if x.dtype != y.dtype or x.shape != y.shape:
        diffs.append(f'{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}')
      elif not np.array_equal(x, y):
        d = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
        diffs.append(f'{k}: max |diff| {d:.3g}')
  return '; '.join(diffs) or None


def compare_csv(a_path: str, b_path: str):
  """None when the rows are equal (wall-clock columns excluded), else the
  first difference."""
  def rows(path):
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      return reader.fieldnames or [], list(reader)
  cols_a, rows_a = rows(a_path)
  cols_b, rows_b = rows(b_path)
  if cols_a != cols_b:
    return f'columns differ: {sorted(set(cols_a) ^ set(cols_b))}'
  if len(rows_a) != len(rows_b):
    return f'{len(rows_a)} rows vs {len(rows_b)}'
  kept = [c for c in cols_a if not TIME_COLUMNS.search(c)]
  diffs = [(i, c) for i, (ra, rb) in enumerate(zip(rows_a, rows_b))
           for c in kept if ra.get(c) != rb.get(c)]
  if not diffs:
    return None
  i, c = diffs[0]
  return (f'{len(diffs)} values differ, first at round '
          f'{rows_a[i].get("round")} {c}: {rows_a[i].get(c)} vs '
          f'{rows_b[i].get(c)}')


def compare_runs(reference_root: str, chaos_root: str) -> dict:
  ref, got = result_files(reference_root), result_files(chaos_root)
  out = dict(compared=ref, missing=sorted(set(ref) - set(got)),
             extra=sorted(set(got) - set(ref)), differ={})
  for rel in sorted(set(ref) & set(got)):
    a, b = os.path.join(reference_root, rel), os.path.join(chaos_root, rel)
    try:
      diff = (compare_npz if rel.endswith('.npz') else compare_csv)(a, b)
    except Exception as e:  # pylint: disable=broad-except
      diff = f'unreadable: {type(e).__name__}: {e}'
    if diff:
      out['differ'][rel] = diff
  out['identical'] = bool(ref) and not (out['missing'] or out['extra']
                                        or out['differ'])
  return out



def summarize(soak, reference: dict, comparison) -> dict:
  """The report of `soak` (a `chaos_soak_lib.Soak`, finished or stopped),
  its `reference` record and `comparison` (`compare_runs`, or None)."""
  by_kind = collections.Counter(f['kind'] for f in soak.faults)
  codes = collections.Counter(str(l['returncode']) for l in soak.lives)
  outcomes = collections.defaultdict(collections.Counter)
  for f in soak.faults:
    if 'returncode' in f:
      what = f'exit {f["returncode"]}'
      if f.get('error_line'):
        what += ': ' + _shape(f['error_line'].split('error: ', 1)[-1])[:120]
    else:
      what = f.get('outcome', '?')
    if f['kind'] == 'damage_checkpoint':
      judged = f.get('judged') or {}
      what = (f'{f.get("damage", {}).get("file")} '
              f'{f.get("damage", {}).get("how")}: '
              f'{judged.get("outcome", "not resumed yet")}')
    outcomes[f['kind']][what] += 1
  reactions = collections.defaultdict(list)
  for f in soak.faults:
    reactions[f['kind']].append(f['reaction_seconds'])
  for f in soak.faults:  # Not JSON-cyclic: the judged record by value.
    if 'judged' in f:
      f['judged'] = {k: v for k, v in f['judged'].items() if k != 'path'}
  hangs = soak.hangs
  tracebacks = sum(1 for l in soak.lives if l.get('traceback'))
  orphans = sum(len(l.get('leftovers', ())) for l in soak.lives)
  identical = comparison['identical'] if comparison else None
  return dict(
      command=soak.command, seed=soak.settings.seed,
      rounds=soak.settings.rounds,
      interval_seconds=[soak.settings.min_interval,
                        soak.settings.max_interval],
      fault_kinds=soak.kinds, notes=soak.notes,
      tmpfs_mb=soak.settings.tmpfs_mb if soak.used_tmpfs else None,
      reference=reference, chaos_end=soak.finished,
      chaos_wall_seconds=soak.wall_seconds,
      time_lost_seconds=round(soak.wall_seconds - reference['wall_seconds'],
                              1),
      faults=len(soak.faults), faults_by_kind=dict(by_kind),
      outcomes_by_kind={k: dict(v) for k, v in outcomes.items()},
      reaction_seconds_by_kind={k: [min(v), float(np.median(v)), max(v)]
                                for k, v in reactions.items()},
      lives=len(soak.lives), restarts=max(len(soak.lives) - 1, 0),
      exit_codes=dict(codes), rounds_redone=soak.rounds_redone,
      faults_held_for_a_checkpoint=soak.deferred,
      seconds_held=round(soak.deferred_seconds, 1),
      tracebacks=tracebacks, hangs=hangs, leftover_processes=orphans,
      checkpoints_set_aside_by_soak=soak.manual_set_asides,
      identical=identical, comparison=comparison,
      findings=soak.findings, fault_log=soak.faults, life_log=soak.lives)


def print_table(report: dict) -> None:
  print()
  print(f'{"fault":<18} {"n":>3}  {"reaction s (min/med/max)":<25} outcomes')
  for kind in chaos_faults.FAULTS:
    n = report['faults_by_kind'].get(kind, 0)
    if not n and kind not in report['fault_kinds']:
      continue
    r = report['reaction_seconds_by_kind'].get(kind)
    r = '/'.join(f'{x:.1f}' for x in r) if r else '-'
    outs = report['outcomes_by_kind'].get(kind, {})
    first = True
    for what, count in sorted(outs.items(), key=lambda kv: -kv[1]) or [
        ('-', 0)]:
      head = (f'{kind:<18} {n:>3}  {r:<25}' if first else ' ' * 49)
      print(f'{head} {count if count else ""}{"x " if count else ""}{what}')
      first = False
  print()
  ref = report['reference']
  print(f'faults {report["faults"]}, lives {report["lives"]}, restarts '
        f'{report["restarts"]}, exit codes {report["exit_codes"]}')
  print(f'chaos wall {report["chaos_wall_seconds"]}s ({report["chaos_end"]})'
        f', reference {ref["wall_seconds"]}s, time lost '
        f'{report["time_lost_seconds"]}s, rounds trained again '
        f'{report["rounds_redone"]}, faults held for a new checkpoint '
        f'{report["faults_held_for_a_checkpoint"]} '
        f'({report["seconds_held"]}s)')
  comp = report['comparison'] or {}
  if report['identical'] is None:
    print('identical: not compared (the chaos run did not finish)')
  else:
    print(f'identical: {"yes" if report["identical"] else "NO"} '
          f'({len(comp.get("compared", []))} files: '
          f'{", ".join(comp.get("compared", []))})')
    for rel, diff in comp.get('differ', {}).items():
      print(f'  differs: {rel}: {diff}')
    for rel in comp.get('missing', []):
      print(f'  missing in the chaos run: {rel}')
  print(f'tracebacks {report["tracebacks"]}, hangs {report["hangs"]}, '
        f'leftover processes {report["leftover_processes"]}, checkpoints '
        f'set aside by the soak {len(report["checkpoints_set_aside_by_soak"])}')
  left = report.get('run_folder_leftovers', {})
  print(f'checkpoints set aside by the run '
        f'{len(left.get("set_aside_by_run", []))}, partial saves left '
        f'{len(left.get("partial_saves", []))}; left in TMPDIR: '
        f'{left.get("worker_logs_left", 0)} worker logs, '
        f'{left.get("autograph_files_left", 0)} autograph files')
  for note in report['notes']:
    print(f'note: {note}')
  print(f'findings: {len(report["findings"])}')
  for finding in report['findings']:
    print(f'  - {finding}')
