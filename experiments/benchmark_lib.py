"""Running the round-time benchmark: interleaved timed rounds, ratios, memory.

Every round, one cohort of clients is sampled and each contender
(`experiments.benchmark_contenders`) runs one round on *the same batches* of
those clients (each client's batch stream is a pure function of (seed, round,
client); FedAvg consumes the first tau batches of it, Per-FedAvg FO the first
2 tau, HF and MAML 3 tau). Contenders are interleaved round by round (their
order rotates), so machine noise hits all of them alike, and the median over
the rounds after warm-up is reported.

Reported per contender: `build_s` (Python tracing and TFF computation
construction), `first_round_s` (includes TFF compilation and the C++ worker's
graph set-up; for a floor, its `tf.function` tracing), `compile_s` (first
round minus the median), `median_round_s` over the measured rounds, and the
ratios Per-FedAvg / FedAvg, TFF / pure-TF floor and TFF (and floor) /
PyTorch peer, each the median over rounds of the per-round ratio (both
measured in the same round). With
`empty_rounds`, also `empty_round_s`: the median round when every client's
data are empty (the fixed cost of a round: broadcast, per-client set-up,
transfers, aggregation, server update), and `compute_ratios`: TFF / floor
with that fixed cost subtracted on both sides (the client computation alone).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Callable

import numpy as np
import psutil

from experiments import benchmark_contenders as contenders_lib
from experiments import benchmark_floor
from experiments import benchmark_report
from experiments import torch_peer
# Imported by name: tests/test_retracing.py also reads these four here.
from experiments.benchmark_contenders import BenchmarkConfig
from experiments.benchmark_contenders import build_contender
from experiments.benchmark_contenders import round_data
from experiments.benchmark_tasks import make_task
from perfed_tff import algorithms as algorithms_lib
from perfed_tff.accelerator import compilation as compilation_lib


def _task(config: BenchmarkConfig):
  """The task `config` names, with its population and seed."""
  return make_task(config.task, num_clients=config.num_clients,
                   examples_per_client=config.examples_per_client,
                   seed=config.seed)


def _rounds_per_call(runner) -> int:
  return getattr(runner, 'rounds_per_call', 1)


def _timed_round(runner, datasets) -> float:
  """Seconds per round of one `run_round` of `runner` on `datasets` (a
  block of rounds for a TFF runner with `rounds_per_invocation` > 1)."""
  t0 = time.perf_counter()
  runner.run_round(datasets)
  return (time.perf_counter() - t0) / _rounds_per_call(runner)


def run_benchmark(config: BenchmarkConfig, log: Callable[[str], None] = print
                  ) -> dict:
  """Runs the benchmark in the current TFF context; returns the results."""
  contenders = list(config.contenders)
  for c in contenders:
    if contenders_lib.split_blocks(c)[0] not in contenders_lib.CONTENDERS:
      raise ValueError(f'unknown contender {c!r}; one of '
                       f'{contenders_lib.CONTENDERS}')
  skipped = collections.OrderedDict()
  reason = torch_peer.unavailable_reason()
  peers = contenders_lib.PEERS
  if reason is not None and any(c in peers for c in contenders):
    log(reason)
    skipped.update((c, reason) for c in contenders if c in peers)
    contenders = [c for c in contenders if c not in peers]
  task = _task(config)
  runners, build_s, compiled_with = {}, {}, {}
  for c in contenders:
    t0 = time.perf_counter()
    runners[c] = build_contender(c, task, config)
    build_s[c] = time.perf_counter() - t0
    log(f'built {c} in {build_s[c]:.1f}s')
    if isinstance(runners[c], contenders_lib.TFFRunner):
      compiled_with[c] = config.graph_optimization
      if compiled_with[c] == 'auto':
        compiled_with[c] = ('runtime' if compilation_lib.has_convolutions(
            runners[c].process.next) else 'tff')

  # All contenders start from the same model (the TFF initial weights).
  init = None
  for c in contenders:
    if isinstance(runners[c], contenders_lib.TFFRunner):
      init = tuple(runners[c].weights().trainable)
      break
  if init is not None:
    for c in contenders:
      if isinstance(runners[c], (benchmark_floor.PureTFFloor,
                                 torch_peer.TorchPeer)):
        runners[c].set_weights([np.asarray(w) for w in init])

  times = collections.defaultdict(list)
  total = config.warmup_rounds + config.rounds
  for r in range(total):
    order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
    for c in order:
      times[c].append(
          _timed_round(runners[c], round_data(runners[c], task, config, c, r)))
    log(f'round {r}: ' + ', '.join(f'{c}={times[c][-1]:.3f}s'
                                   for c in contenders))

  results = collections.OrderedDict()
  for c in contenders:
    measured = times[c][config.warmup_rounds:]
    median = statistics.median(measured) if measured else float('nan')
    # The first invocation whole (a block: its K rounds, compilation once).
    first = times[c][0] * _rounds_per_call(runners[c])
    results[c] = collections.OrderedDict(
        build_s=build_s[c],
        first_round_s=first,
        compile_s=first - median * _rounds_per_call(runners[c]),
        rounds_per_invocation=_rounds_per_call(runners[c]),
        median_round_s=median,
        round_s=measured,
        gradient_evaluations_per_round=(
            algorithms_lib.gradient_evaluations_per_round(
                contenders_lib.algorithm_of(c), config.local_steps)
            * config.clients_per_round),
        graph_optimization=compiled_with.get(c))

  def ratio(a, b):
    if a in results and b in results:
      return results[a]['median_round_s'] / results[b]['median_round_s']
    return None

  # Per-round ratios, each from one round where both ran side by side, and
  # their median (robust to a noisy round).
  def round_ratio(a, b):
    if a not in results or b not in results:
      return None
    return statistics.median(
        x / y for x, y in zip(results[a]['round_s'], results[b]['round_s']))

  ratios = collections.OrderedDict()
  for base in ('fedavg', 'fedavg_reduce'):
    for alg in ('per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml'):
      r = round_ratio(alg, base)
      if r is not None:
        ratios[f'{alg}/{base}'] = r
  for alg, floor in contenders_lib.FLOOR_OF.items():
    r = round_ratio(alg, floor)
    if r is not None:
      ratios[f'{alg}/{floor}'] = r
  for alg, peer in contenders_lib.PEER_OF.items():
    for contender in (alg, contenders_lib.FLOOR_OF[alg]):
      r = round_ratio(contender, peer)
      if r is not None:
        ratios[f'{contender}/{peer}'] = r
  # `alg@K` beside `alg`: the same contender with another number of rounds
  # per invocation, against alg, its floor and its peer, round by round.
  for c in results:
    base, blocks = contenders_lib.split_blocks(c)
    if blocks is None:
      continue
    for other in (base, contenders_lib.FLOOR_OF.get(base),
                  contenders_lib.PEER_OF.get(base)):
      r = round_ratio(c, other) if other else None
      if r is not None:
        ratios[f'{c}/{other}'] = r
  # Fixed cost of a round: the same rounds with every client's data empty
  # (no local step: what is left is broadcast, per-client set-up, transfer,
  # aggregation and the server update). Subtracting it from both sides gives
  # the TFF / floor ratio of the client computation alone.
  compute_ratios = collections.OrderedDict()
  if config.empty_rounds:
    for c in contenders:
      empty_times = [
          _timed_round(runners[c],
                       round_data(runners[c], task, config, c, r, empty=True))
          for r in range(config.empty_rounds + 1)]
      results[c]['empty_round_s'] = statistics.median(empty_times[1:])
    pairs = list(contenders_lib.FLOOR_OF.items()) + [
        (c, contenders_lib.FLOOR_OF.get(contenders_lib.split_blocks(c)[0]))
        for c in results if '@' in c]
    for alg, floor in pairs:
      if alg in results and floor in results:
        compute_ratios[f'{alg}/{floor}'] = (
            (results[alg]['median_round_s'] - results[alg]['empty_round_s']) /
            (results[floor]['median_round_s'] -
             results[floor]['empty_round_s']))
  memory = None
  if config.memory_rounds:
    memory = measure_memory(task, runners, config, log)
  return collections.OrderedDict(
      config=dataclasses.asdict(config) | {'contenders': contenders},
      task_note=task.data_note,
      results=results,
      ratios=ratios,
      ratio_of_medians=collections.OrderedDict(
          (k, ratio(*k.split('/'))) for k in ratios),
      compute_ratios=compute_ratios,
      memory=memory,
      skipped=skipped,
      environment=benchmark_report.environment_info())


def run_compilation_ab(config: BenchmarkConfig, contexts: dict,
                       log: Callable[[str], None] = print) -> dict:
  """Same-process A/B of compilations: `contexts` maps a name (e.g.
  'runtime', 'tff') to an open `perfed_tff.accelerator.AcceleratedContext`; every TFF
  contender of `config.contenders` is built and run under each, alternating
  which goes first, on the same batches. Returns per contender the median
  round under each and the median of the per-round ratios (first name /
  second name)."""
  names = list(contexts)
  if len(names) != 2:
    raise ValueError(f'expected two contexts, got {names}')
  contenders = [c for c in config.contenders
                if c not in contenders_lib.FLOORS + contenders_lib.PEERS]
  task = _task(config)
  runners = {}
  for name in names:
    with contexts[name].activated():
      for c in contenders:
        runners[(name, c)] = build_contender(c, task, config)
  times = collections.defaultdict(list)
  for r in range(config.warmup_rounds + config.rounds):
    for c in contenders:
      for name in (names if r % 2 else names[::-1]):
        runner = runners[(name, c)]
        with contexts[name].activated():
          times[(name, c)].append(_timed_round(
              runner, round_data(runner, task, config, c, r)))
    log(f'round {r}: ' + ', '.join(
        f'{c}[{n}]={times[(n, c)][-1]:.3f}s' for c in contenders
        for n in names))
  out = collections.OrderedDict()
  for c in contenders:
    a = times[(names[0], c)][config.warmup_rounds:]
    b = times[(names[1], c)][config.warmup_rounds:]
    out[c] = collections.OrderedDict(
        [(f'{names[0]}_median_round_s', statistics.median(a)),
         (f'{names[1]}_median_round_s', statistics.median(b)),
         (f'{names[0]}/{names[1]}',
          statistics.median(x / y for x, y in zip(a, b)))])
  return collections.OrderedDict(
      config=dataclasses.asdict(config) | {'contenders': contenders},
      task_note=task.data_note, compilation_ab=out,
      environment=benchmark_report.environment_info())


def rss_bytes() -> dict:
  """Resident memory of this process and of its worker_binary children."""
  me = psutil.Process()
  workers = 0
  for child in me.children(recursive=True):
    try:
      if 'worker_binary' in ' '.join(child.cmdline() or []):
        workers += child.memory_info().rss
    except psutil.Error:
      pass
  return {'python': me.memory_info().rss, 'worker': workers}


def measure_memory(task, runners, config, log) -> dict:
  """RSS (this process and the TFF worker) over `memory_rounds` rounds of
  `memory_contender`; growth is the mean of the last 10% of the rounds
  against the mean of rounds (10%, 20%] (the first 10% warm the allocator)."""
  c = config.memory_contender
  runner = runners.get(c) or build_contender(c, task, config)
  samples = []
  for r in range(config.memory_rounds):
    runner.run_round(round_data(runner, task, config, c, 1000 + r))
    samples.append(rss_bytes())
    if (r + 1) % 10 == 0:
      log(f'memory round {r + 1}: {samples[-1]}')
  # RSS oscillates by tens of MiB from round to round (allocator caches), so
  # compare window means: rounds (10%, 20%] against the last 10%.
  n = len(samples)
  w = max(1, n // 10)
  first = samples[w:2 * w] or samples[:1]
  last = samples[-w:]
  start = {k: float(np.mean([s[k] for s in first])) for k in samples[0]}
  end = {k: float(np.mean([s[k] for s in last])) for k in samples[0]}

  def growth(key):
    return (end[key] - start[key]) / start[key] if start[key] else None

  total_start = start['python'] + start['worker']
  total_end = end['python'] + end['worker']
  return collections.OrderedDict(
      contender=c, rounds=config.memory_rounds,
      rss_start_mb={k: v / 2**20 for k, v in start.items()},
      rss_end_mb={k: v / 2**20 for k, v in end.items()},
      growth_python=growth('python'), growth_worker=growth('worker'),
      growth_total=(total_end - total_start) / total_start,
      rss_mb_per_round=[(s['python'] + s['worker']) / 2**20 for s in samples],
      worker_rss_mb_per_round=[s['worker'] / 2**20 for s in samples])
