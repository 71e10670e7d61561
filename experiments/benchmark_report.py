"""The benchmark's report: its Markdown table, its JSON file and the
environment it ran in."""

from __future__ import annotations

import collections
import json
import os

import tensorflow as tf
import tensorflow_federated as tff

from experiments import benchmark_contenders as contenders_lib
from experiments import torch_peer


def environment_info() -> dict:
  """Versions, CPUs, GPUs and thread settings of this process and the worker."""
  torch_version = None
  if torch_peer.unavailable_reason() is None:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
  return collections.OrderedDict(
      tensorflow=tf.__version__,
      torch=torch_version,
      tensorflow_federated=tff.__version__,
      cpus=os.cpu_count(),
      gpus=[d.name for d in tf.config.list_physical_devices('GPU')],
      intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
      inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
      worker_env={k: os.environ[k] for k in
                  ('TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS',
                   'OMP_NUM_THREADS') if k in os.environ})


def markdown_table(report: dict) -> str:
  """The results as a Markdown table."""
  results = report['results']
  ratios = report['ratios']
  cfg = report['config']
  lines = [
      f"Task `{cfg['task']}` ({report['task_note']}); "
      f"{cfg['clients_per_round']} clients/round, tau={cfg['local_steps']}, "
      f"batch {cfg['batch_size']}; median of {cfg['rounds']} rounds after "
      f"{cfg['warmup_rounds']} warm-up; ratios are medians of per-round "
      f"ratios (contenders interleaved in every round); TFF worker and floor "
      f"run {cfg['max_concurrent_computation_calls']} clients at a time; "
      + (f"TFF contenders run {cfg['rounds_per_invocation']} rounds per "
         "invocation (the training program's blocks; a measured round is "
         "a block's time / K, its first round the first block whole); "
         if cfg.get('rounds_per_invocation', 1) > 1 else
         "TFF contenders run one round per invocation; ") +
      f"TFF graphs compiled with graph_optimization="
      f"'{cfg.get('graph_optimization', 'tff')}'"
      + (' (' + ', '.join(f"{c}: {r['graph_optimization']}"
                          for c, r in results.items()
                          if r.get('graph_optimization')) + ')'
         if cfg.get('graph_optimization') == 'auto' else '') + '.',
      '',
      '| contender | grad evals / round | median round (s) | vs FedAvg '
      '| vs FedAvg (TFF default loop) | TFF / pure-TF floor '
      '| vs PyTorch peer | no-data round (s) | TFF / floor, compute only '
      '| first round (s) | build (s) |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  peer_of = dict(contenders_lib.PEER_OF)
  peer_of.update((contenders_lib.FLOOR_OF[a], p)
                 for a, p in contenders_lib.PEER_OF.items())
  floor_of = dict(contenders_lib.FLOOR_OF)
  for c in results:  # `alg@K`: alg with K rounds per invocation.
    base, blocks = contenders_lib.split_blocks(c)
    if blocks is not None:
      peer_of[c] = contenders_lib.PEER_OF.get(base)
      floor_of[c] = contenders_lib.FLOOR_OF.get(base)

  def fmt(key, self_name):
    if key in ratios:
      return f'{ratios[key]:.2f}'
    return '1.00' if key == f'{self_name}/{self_name}' else ''

  for c, r in results.items():
    vs = fmt(f'{c}/fedavg', c) if 'fedavg' in results else ''
    vi = (fmt(f'{c}/fedavg_reduce', c) if 'fedavg_reduce' in results
          else '')
    if c in contenders_lib.FLOORS or c in contenders_lib.PEERS:
      vs = vi = ''
    floor = floor_of.get(c)
    vf = (f"{ratios[f'{c}/{floor}']:.2f}" if floor and f'{c}/{floor}' in ratios
          else '')
    compute = report.get('compute_ratios', {})
    vc = (f"{compute[f'{c}/{floor}']:.2f}"
          if floor and f'{c}/{floor}' in compute else '')
    empty = r.get('empty_round_s')
    ve = f'{empty:.3f}' if empty is not None else ''
    peer = peer_of.get(c)
    vp = (f"{ratios[f'{c}/{peer}']:.2f}" if peer and f'{c}/{peer}' in ratios
          else '')
    lines.append(
        f"| {c} | {r['gradient_evaluations_per_round']} | "
        f"{r['median_round_s']:.3f} | {vs} | {vi} | {vf} | {vp} | {ve} | "
        f"{vc} | {r['first_round_s']:.2f} | {r['build_s']:.1f} |")
  for c, reason in report.get('skipped', {}).items():
    lines.append(f'| {c} | skipped: {reason} |')
  mem = report.get('memory')
  if mem:
    lines += ['', f"Resident memory over {mem['rounds']} rounds of "
              f"`{mem['contender']}`: {mem['rss_start_mb']['python']:.0f} -> "
              f"{mem['rss_end_mb']['python']:.0f} MiB (Python), "
              f"{mem['rss_start_mb']['worker']:.0f} -> "
              f"{mem['rss_end_mb']['worker']:.0f} MiB (TFF worker); growth "
              f"{100 * mem['growth_total']:.1f}% in total."]
  return '\n'.join(lines)


def write_json(report: dict, path: str) -> None:
  """Writes `report` as indented JSON (values JSON lacks as strings)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2, default=str)
