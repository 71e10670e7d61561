"""Run supervision: keeps a training run answerable to signals, deadlines and
dead workers, so the training loop itself stays a plain loop.

One place for everything that watches a run from outside its computations:

* **Interrupts** (`perfed_tff.program.interrupts`): while a run is
  supervised, a SIGINT, SIGTERM or SIGHUP ends the calls in flight (the
  watchdog aborts the context, from its thread) instead of raising in the
  middle of whatever the main thread runs; the error that follows is
  reported as the interrupt. Checkpoint writes defer it.
* **Deadlines and health checks.** `Watchdog` (a thread) gives every phase of
  a run (start-up, a round, an evaluation, a checkpoint write) a deadline and
  health-checks the workers of the current `ExecutionContext` while it runs;
  a frozen, dead or unreachable worker, or a phase past its deadline, aborts
  the context, so the loop gets an exception at once.
* **A fresh event loop.** `Supervisor.run(fn)` runs TFF's loop with
  `perfed_tff.program.event_loop.run_sync` (a helper thread where an event
  loop is already running: Jupyter).
* **Stop checks and error translation.** `Supervisor` ties these together
  for one run: `begin`/`end` mark phases, `check_stop()` raises between
  rounds when an interrupt arrived, and
  leaving it with an exception turns whatever the abort or signal caused into
  the typed error that names the cause (`WorkerUnavailableError`,
  `RoundTimeoutError`, `Interrupted` with the phase it stopped; TensorFlow's
  `ResourceExhaustedError` of a full disk becomes an `OSError` with errno
  ENOSPC and the file's path), with the local workers' logs kept in the run
  folder. The binaries map those typed
  errors to one line and an exit status (`experiments/cli.py`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import statistics
import threading
import time
from typing import Any, Callable, Optional

from perfed_tff.program import event_loop
from perfed_tff.program.interrupts import clear_interrupt
from perfed_tff.program.interrupts import critical_section
from perfed_tff.program.interrupts import interrupt_received
from perfed_tff.program.interrupts import Interrupted
from perfed_tff.program.interrupts import stop_hook
from perfed_tff.runtime import execution
from perfed_tff.runtime.worker_errors import RoundTimeoutError
from perfed_tff.runtime.worker_errors import WorkerUnavailableError


# The default (`round_timeout=0`) deadline of a phase: a round may take
# ROUND_TIMEOUT_FACTOR x the median round (rounds 2+), at least
# MIN_ROUND_TIMEOUT s; before two rounds are measured (compilation),
# FIRST_ROUND_TIMEOUT s. Evaluations get EVAL_TIMEOUT_FACTOR x a round's
# deadline (at least MIN_EVAL_TIMEOUT s), checkpoint writes
# FIRST_ROUND_TIMEOUT s (or `round_timeout` when set). Start-up and the first
# round of a process (tracing, compilation) get at least FIRST_ROUND_TIMEOUT.
ROUND_TIMEOUT_FACTOR = 20.0
MIN_ROUND_TIMEOUT = 60.0
FIRST_ROUND_TIMEOUT = 600.0
EVAL_TIMEOUT_FACTOR = 10.0
MIN_EVAL_TIMEOUT = 1800.0
HEALTH_CHECK_AFTER = 2.0    # s into a phase before the first health check
HEALTH_CHECK_EVERY = 5.0    # s between health checks
# s after a signal's stop of the calls in flight before the main thread, if
# still inside the run, is interrupted where it is.
INTERRUPT_GRACE = 5.0


# ---------------------------------------------------------------- watchdog

class Watchdog:
  """Deadlines and worker health checks of a run's phases (a thread).

  The main thread marks phases with `begin(label, kind)` / `end()`. While a
  phase runs, the workers of `context` (an `ExecutionContext` or None) are
  health-checked after HEALTH_CHECK_AFTER s and then every
  HEALTH_CHECK_EVERY s; a failed check, or the phase running past its
  deadline, sets `error` and aborts `context` (the calls in flight fail, local
  workers are killed), so the main thread gets an exception. A phase past
  its notice time is reported through `write` (then at doubling times).
  """

  def __init__(self, *, round_timeout: float, health_timeout: float,
               write: Callable[[str], None], context=None):
    self._explicit = round_timeout
    self._health_timeout = health_timeout
    self._write = write
    self._context = context
    self._lock = threading.Lock()
    self._phase = None  # (label, kind, start, rounds)
    self._seconds = collections.defaultdict(list)
    self._done = threading.Event()
    self.error = None
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='perfed_tff-watchdog')
    self._thread.start()

  def begin(self, label: str, kind: str, rounds: int = 1) -> None:
    """A phase starts; `rounds` training rounds run in it (a block of
    rounds in one invocation: its deadline is `rounds` round deadlines, and
    it is measured as `rounds` rounds of equal length)."""
    now = time.monotonic()
    with self._lock:
      self._close_phase(now)
      self._phase = (label, kind, now, max(1, rounds))

  def end(self) -> None:
    with self._lock:
      self._close_phase(time.monotonic())
      self._phase = None

  def _close_phase(self, now: float) -> None:
    if self._phase is not None:
      _, kind, start, rounds = self._phase
      self._seconds[kind].append((now - start) / rounds)

  def stop(self) -> None:
    self._done.set()
    self.end()

  def wait_done(self, timeout: float) -> bool:
    """Whether the run's supervision ended within `timeout` seconds."""
    return self._done.wait(timeout)

  def phase(self) -> Optional[str]:
    """The label of the phase running now (None between phases)."""
    with self._lock:
      return None if self._phase is None else self._phase[0]

  def deadline(self, kind: str) -> float:
    """Seconds the current phase of `kind` may take."""
    with self._lock:
      measured = list(self._seconds['round'])
    if kind == 'initialization' or (kind == 'round' and not measured):
      # Start-up and this process's first round trace and compile.
      return max(self._explicit, FIRST_ROUND_TIMEOUT)
    rounds = measured[1:]
    if self._explicit:
      base = self._explicit
    elif len(rounds) >= 2:
      base = max(MIN_ROUND_TIMEOUT,
                 ROUND_TIMEOUT_FACTOR * statistics.median(rounds))
    else:
      base = FIRST_ROUND_TIMEOUT
    if kind == 'evaluation':
      return (EVAL_TIMEOUT_FACTOR * base if self._explicit else
              max(MIN_EVAL_TIMEOUT, EVAL_TIMEOUT_FACTOR * base))
    if kind == 'checkpoint':
      return self._explicit or FIRST_ROUND_TIMEOUT
    return base

  def _watch(self) -> None:
    checked_at = notice = None
    current = None
    while not self._done.wait(0.5):
      now = time.monotonic()
      if interrupt_received() is not None:
        continue  # The run is stopping: stopped workers are no failure.
      with self._lock:
        phase = self._phase
      if phase is None:
        continue
      label, kind, start, rounds = phase
      if phase is not current:
        current, checked_at = phase, None
        notice = max(30.0, rounds * self.deadline(kind) / 8)
      elapsed = now - start
      if (self._context is not None and elapsed >= HEALTH_CHECK_AFTER and
          (checked_at is None or now - checked_at >= HEALTH_CHECK_EVERY)):
        checked_at = now
        bad = self._context.unhealthy(self._health_timeout)
        with self._lock:
          still = self._phase is phase
        if bad and still and not self._done.is_set():
          address, why = bad[0]
          self._fail(WorkerUnavailableError(
              f'{self._context.describe(address)} {why} during {label}; '
              'stopped the run.'), phase)
          return
      limit = rounds * self.deadline(kind)
      if elapsed > limit and not self._done.is_set():
        flag = (f'`round_timeout`={self._explicit:g}' if self._explicit
                else 'raise it with `round_timeout`')
        self._fail(RoundTimeoutError(
            f'{label} did not finish within its {limit:.0f}s deadline '
            f'({flag}); stopped the run.'), phase)
        return
      if elapsed >= notice:
        self._write(f'{label} still running after {elapsed:.0f}s (deadline '
                    f'{limit:.0f}s)')
        notice *= 2

  def _fail(self, error, phase) -> None:
    self.error = error
    if self._context is not None:
      self._context.abort(error)
    # Blocked outside a worker call (nothing to cancel): interrupt it.
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not self._done.is_set():
      with self._lock:
        if self._phase is not phase:
          return
      time.sleep(0.2)
    if not self._done.is_set():
      import _thread  # pylint: disable=g-import-not-at-top
      _thread.interrupt_main()


# -------------------------------------------------------------- full disk

_NO_SPACE = 'No space left on device'
# TensorFlow's file systems report a failed write as "<path>; No space left
# on device" (errno ENOSPC as a ResourceExhaustedError).
_NO_SPACE_PATH = re.compile(r'(/[^;:\'"\n]*?)\s*[;:]\s*' + _NO_SPACE)


def disk_full_error(error: BaseException,
                    default_path: Optional[str] = None) -> Optional[OSError]:
  """`error` as `OSError(ENOSPC, ..., path)` when it is TensorFlow's report
  of a full disk (`tf.errors.ResourceExhaustedError: ...; No space left on
  device`, e.g. from a checkpoint write): `path` is the file TensorFlow
  names, else `default_path`. None for anything else (an out-of-memory
  `ResourceExhaustedError` included)."""
  if (type(error).__name__ != 'ResourceExhaustedError'
      or _NO_SPACE not in str(error)):
    return None
  match = _NO_SPACE_PATH.search(str(error))
  return OSError(errno.ENOSPC, _NO_SPACE,
                 match.group(1) if match else default_path)


# -------------------------------------------------------------- supervisor

class Supervisor:
  """Supervises one training run in the current `ExecutionContext`.

  Use as a context manager around the run. Inside, `begin(label, kind)` /
  `end()` mark phases for the `Watchdog`, `check_stop()` (between rounds)
  raises a pending interrupt, `saving()` wraps a checkpoint write, and
  `run(fn)` runs TFF's loop with a fresh event loop. Leaving with an
  exception raises the typed error of its cause instead (see the module
  docstring); the logs of the context's local workers are then copied into
  `run_dir` and named in the message.

  Args:
    round_timeout: a phase's deadline base in seconds (0: from measured
      rounds; see the module's constants).
    health_timeout: seconds a worker health check may take.
    write: where notices of long phases go.
    run_dir: where worker logs are kept when a worker fails.
  """

  def __init__(self, *, round_timeout: float, health_timeout: float,
               write: Callable[[str], None], run_dir: str):
    self._context = execution.current()
    self._run_dir = run_dir
    self._watchdog = Watchdog(round_timeout=round_timeout,
                              health_timeout=health_timeout, write=write,
                              context=self._context)
    self._stop = threading.Event()
    self._signalled = False
    self._hook = stop_hook(self._on_signal)

  def begin(self, label: str, kind: str, rounds: int = 1) -> None:
    self._watchdog.begin(label, kind, rounds)

  def end(self) -> None:
    self._watchdog.end()

  def _on_signal(self, signum: int) -> None:
    """A signal during the run (`perfed_tff.program.interrupts`): the calls
    in flight are ended from a helper thread; a second one (or this
    supervisor's own wake-up) raises in the main thread."""
    if self._signalled or self._watchdog.error is not None:
      raise Interrupted(interrupt_received() or signum)
    self._signalled = True
    threading.Thread(target=self._stop_for_signal, daemon=True,
                     name='perfed_tff-interrupt').start()

  def _stop_for_signal(self) -> None:
    if self._context is not None:
      self._context.abort(WorkerUnavailableError('stopped by a signal'))
    # Busy outside a worker call: wake the main thread once it had a moment
    # to reach the next stop check on its own.
    if not self._watchdog.wait_done(INTERRUPT_GRACE):
      import _thread  # pylint: disable=g-import-not-at-top
      _thread.interrupt_main()

  def check_stop(self) -> None:
    """Raises the interrupt that arrived since the run began
    (`Interrupted`), or KeyboardInterrupt when the waiting thread was
    interrupted (`run_sync` in Jupyter)."""
    signum = interrupt_received()
    if signum is not None:
      raise Interrupted(signum)
    if self._stop.is_set():
      raise KeyboardInterrupt

  def run(self, work: Callable[[], Any]):
    """`event_loop.run_sync(work)`, interruptible between rounds."""
    return event_loop.run_sync(work, self._stop)

  @contextlib.contextmanager
  def saving(self, label: str):
    """A watched, uninterruptible phase for a checkpoint write:
    `with supervisor.saving('checkpoint 5'): ...`. A deferred interrupt
    raises at its end, with the phase still named."""
    self.begin(label, 'checkpoint')
    with critical_section():
      yield
    self.end()

  def __enter__(self) -> 'Supervisor':
    self._hook.__enter__()
    return self

  def __exit__(self, exc_type, error, tb) -> None:
    try:
      translated = None if error is None else self.translate(error)
    finally:
      self._watchdog.stop()
      self._hook.__exit__(None, None, None)
    if translated is None:
      return None
    if translated is error:
      return None  # Propagates as it is.
    raise translated from None

  def translate(self, error: BaseException) -> BaseException:
    """The typed error of what caused `error`."""
    if self._watchdog.error is not None:
      # Its abort (or, blocked elsewhere, its interrupt) caused `error`.
      clear_interrupt()
      return self._with_worker_logs(self._watchdog.error)
    signum = interrupt_received()
    if signum is not None and not isinstance(error, KeyboardInterrupt):
      # The signal ended the calls in flight: the error that followed is
      # the interrupt's.
      error = Interrupted(signum)
    if isinstance(error, KeyboardInterrupt):
      if not hasattr(error, 'phase'):
        error.phase = self._watchdog.phase()  # For the one-line message.
      return error
    if isinstance(error, WorkerUnavailableError):
      failure = getattr(error, 'worker_failure', None)
      phase = self._watchdog.phase()
      if failure and phase:
        # As the watchdog says it: the worker, what happened, the phase.
        who, why = failure
        error = type(error)(f'{who} {why} during {phase}; stopped the run.')
      return self._with_worker_logs(error)
    full = disk_full_error(error, self._run_dir)
    if full is not None:
      return full
    return error

  def _with_worker_logs(self, error):
    """`error` with the logs of the context's local workers copied into the
    run folder (and named in the message)."""
    kept = []
    for worker in getattr(self._context, 'local_workers', ()):
      path = worker.keep_log(os.path.join(self._run_dir,
                                          f'worker_{worker.port}.log'))
      if path:
        kept.append(path)
    if not kept:
      return error
    return type(error)(f'{str(error).rstrip()} (worker log: '
                       f'{", ".join(kept)})')
