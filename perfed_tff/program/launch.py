"""The training program's one door to the optional outer ring.

A run's `runtime` setting (`TrainingConfig.runtime`, `--runtime`) says where
its computations run:

* 'tff' (the library's default): the current TFF context, TFF's own C++
  context unless you installed another; the program uses TFF's public API
  only, and the outer ring is never imported;
* 'owned': `perfed_tff.runtime.ExecutionContext`, whose worker this library
  starts (on loopback only), supervises (deadlines, health checks, signals
  that end the calls in flight, one-line errors) and stops;
* 'accelerated' (the binaries' default): that context with
  `perfed_tff.accelerator` (computations kept compiled and on the worker and
  across runs, rounds in blocks per invocation, fused rounds, FedAvg with
  less fixed cost per client).

The weights and metrics are the same in all three (tests/test_ring_parity.py).
Every other module of the program is written against TFF's public API; this
one imports the outer ring, and only inside the functions that need it, so
that a run with 'tff' works on any TFF version the library supports.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

from perfed_tff import checks
from perfed_tff import fed_avg
from perfed_tff.program import event_loop
from perfed_tff.program import interrupts

RUNTIMES = ('tff', 'owned', 'accelerated')


def _import_ring(runtime: str):
  """The outer ring's modules `runtime` needs (imported now).

  Raises:
    checks.ArgumentError (runtime): the ring refuses this TFF version.
  """
  try:
    from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
    if runtime == 'accelerated':
      from perfed_tff.accelerator import context  # pylint: disable=g-import-not-at-top
      return context
  except ImportError as e:
    raise checks.ArgumentError('runtime', f'{runtime!r}: {e}') from None
  return execution


def check_runtime(runtime: str) -> str:
  """One of `RUNTIMES` whose ring can run here.

  Raises:
    checks.ArgumentError (runtime): another name, or an outer ring that
      refuses the installed TFF (its one line says how to run without it).
  """
  runtime = checks.choice('runtime', runtime, RUNTIMES)
  if runtime != 'tff':
    _import_ring(runtime)
  return runtime


def check_runtime_settings(config) -> None:
  """The settings only a ring uses are left at their defaults without it.

  Raises:
    checks.ArgumentError: `workers`, `round_timeout` without the owned
      runtime; `graph_optimization` other than 'auto',
      `rounds_per_invocation` > 1 without the accelerator; a
      `graph_optimization` the accelerator does not know.
  """
  if config.runtime == 'accelerated':
    from perfed_tff.accelerator import compilation  # pylint: disable=g-import-not-at-top
    compilation.check_graph_optimization(config.graph_optimization)
  owned = {'workers': bool(config.workers),
           'round_timeout': config.round_timeout != 0}
  accelerated = {'graph_optimization': config.graph_optimization != 'auto',
                 'rounds_per_invocation': config.rounds_per_invocation > 1}
  need = (list(owned.items()) if config.runtime == 'tff' else []) + (
      list(accelerated.items()) if config.runtime != 'accelerated' else [])
  for name, given in need:
    if given:
      wanted = "'owned' or 'accelerated'" if name in owned else "'accelerated'"
      raise checks.ArgumentError(
          name, f'needs runtime {wanted} (the outer ring), but runtime is '
          f'{config.runtime!r}')


def execution_context(config, *, resumable: bool):
  """The context manager of a run's execution context: none of its own for
  'tff' (the current TFF context runs it), else the owned runtime's (the
  accelerator's), with a local worker or `config.workers`.

  Raises:
    perfed_tff.runtime.worker_errors.WorkerUnreachableError (an
      `ArgumentError` naming `workers`): a `config.workers` address does not
      answer and the run is not `resumable`; a resumable run raises the
      context's `WorkerUnavailableError` (rerunning resumes once the worker
      is back).
  """
  if config.runtime == 'tff':
    return contextlib.nullcontext()
  module = _import_ring(config.runtime)
  from perfed_tff.runtime import worker_errors  # pylint: disable=g-import-not-at-top
  # A local worker may start slowly on a busy machine: wait at least 60s.
  ready = (config.worker_timeout if config.workers
           else max(60.0, config.worker_timeout))
  kwargs = dict(workers=list(config.workers) or None, ready_timeout=ready,
                retry_timeout=config.worker_timeout)
  try:
    if config.runtime == 'accelerated':
      return module.AcceleratedContext(
          graph_optimization=config.graph_optimization, **kwargs)
    return module.ExecutionContext(**kwargs)
  except worker_errors.WorkerUnavailableError as e:
    address = e.unready_address
    if address is None or resumable:
      raise
    port = address.rpartition(':')[2]
    raise worker_errors.WorkerUnreachableError(
        'workers', f'no TFF worker answered at {address} within '
        f'{e.ready_timeout:g}s, so no run was started; check that '
        f'`python -m perfed_tff.runtime.worker --port={port}` is running on '
        'that host and that the host and port are right and reachable from '
        'here (a worker listens on its own loopback only unless started '
        'with `--listen=all`, or reach it through an SSH tunnel; one still '
        'starting up may need a longer worker_timeout)') from None


class PlainSupervisor:
  """What the training loop asks of a supervisor, without the owned
  runtime: no deadlines or health checks (TFF's context has no workers this
  library can watch); signals reach the run through
  `perfed_tff.program.interrupts` where its handler is installed, and a
  checkpoint write defers them."""

  def begin(self, label: str, kind: str, rounds: int = 1) -> None:
    del label, kind, rounds

  def end(self) -> None:
    pass

  def check_stop(self) -> None:
    signum = interrupts.interrupt_received()
    if signum is not None:
      raise interrupts.Interrupted(signum)

  def run(self, work):
    return event_loop.run_sync(work)

  @contextlib.contextmanager
  def saving(self, label: str):
    del label
    with interrupts.critical_section():
      yield

  def __enter__(self) -> 'PlainSupervisor':
    return self

  def __exit__(self, *exc_info) -> None:
    return None


def supervisor(config, *, write: Callable[[str], None]):
  """The supervisor of a run of `config` in the current context
  (`perfed_tff.runtime.supervision.Supervisor` with the owned runtime)."""
  if config.runtime == 'tff':
    return PlainSupervisor()
  _import_ring(config.runtime)
  from perfed_tff.runtime import supervision  # pylint: disable=g-import-not-at-top
  return supervision.Supervisor(
      round_timeout=config.round_timeout,
      health_timeout=config.worker_timeout, write=write,
      run_dir=config.run_dir)


def training_processes(config, task, build: Callable[[], tuple]) -> tuple:
  """(process, worker-side process) of the run: `build()`, or under the
  accelerator the ones an earlier run with the same settings traced
  (`perfed_tff.accelerator.computation_cache`)."""
  if config.runtime != 'accelerated':
    return build()
  from perfed_tff.accelerator import computation_cache  # pylint: disable=g-import-not-at-top
  return computation_cache.training_processes(config, task, build)


def evaluation(config, task, build: Callable[[], object], **settings):
  """The run's `PersonalizedEvaluation`: `build()`, or under the
  accelerator the one an earlier run traced (`settings` are the
  evaluation's own, part of the cache key)."""
  if config.runtime != 'accelerated':
    return build()
  from perfed_tff.accelerator import computation_cache  # pylint: disable=g-import-not-at-top
  return computation_cache.evaluation(config, task, build, **settings)


def round_blocks(config, process, on_worker, *,
                 round_inputs: Callable[[int], list]):
  """The accelerator's `RoundBlocks` of the run (several rounds per
  invocation, fused rounds), or None: one round per TFF invocation."""
  if config.runtime != 'accelerated':
    return None
  from perfed_tff.accelerator import round_blocks as blocks_lib  # pylint: disable=g-import-not-at-top
  return blocks_lib.for_run(config, process, on_worker,
                            round_inputs=round_inputs)


def fed_avg_builder(config) -> Callable:
  """`builder(task, **kwargs)` of the run's FedAvg: the core's
  `perfed_tff.fed_avg.build_fed_avg(task.model_fn, **kwargs)`, or the
  accelerator's faster build of the same process."""
  if config.runtime != 'accelerated':
    return lambda task, **kwargs: fed_avg.build_fed_avg(task.model_fn,
                                                        **kwargs)
  from perfed_tff.accelerator import fed_avg as fast_fed_avg  # pylint: disable=g-import-not-at-top
  return fast_fed_avg.build_fed_avg


def worker_error_types() -> tuple:
  """(WorkerUnavailableError,) once the owned runtime is in use, else ():
  the errors of workers the binaries report in one line."""
  module = sys.modules.get('perfed_tff.runtime.worker_errors')
  return () if module is None else (module.WorkerUnavailableError,)


def stop_owned_workers() -> None:
  """Stops every worker the owned runtime started in this process (none
  when it was never used)."""
  module = sys.modules.get('perfed_tff.runtime.local_worker')
  if module is not None:
    module.stop_all_workers()
