"""Interrupts of a run: SIGINT, SIGTERM and SIGHUP raised as `Interrupted`
in the main thread, never lost, and held off during critical sections.

`install_interrupt_handlers()` makes those signals raise `Interrupted` (a
`KeyboardInterrupt` with `exit_status` = 128 + signum) in the main thread;
where Python would swallow it (a garbage collection, a finalizer) it is
delivered again a moment later. `critical_section()` defers it to the end of
a block (a checkpoint is written whole). `interrupt_received()` tells a
signal that arrived even when its exception was swallowed on the way
(`supervision.Supervisor.check_stop` asks it between rounds).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from typing import Optional


class Interrupted(KeyboardInterrupt):
  """SIGINT, SIGTERM or SIGHUP, raised in the main thread by the handlers of
  `install_interrupt_handlers`. `exit_status`: 128 + the signal number."""

  def __init__(self, signum: int):
    self.signum = int(signum)
    super().__init__(self.signal_name)

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_critical = {'depth': 0, 'pending': None, 'received': None}
_in_gc = [False]


def _gc_start(phase, info):
  del info
  # Handlers run in the main thread: only its collections matter (another
  # thread's can last, e.g. a finalizer waiting on a lock, and would defer
  # every signal while it does).
  if phase == 'start' and threading.current_thread() is threading.main_thread():
    _in_gc[0] = True


def _gc_stop(phase, info):
  del info
  if phase == 'stop' and threading.current_thread() is threading.main_thread():
    _in_gc[0] = False


def _unsafe_to_raise(frame) -> bool:
  """Whether `frame` runs where Python swallows an exception ("Exception
  ignored in ..."): during a garbage collection (its callbacks, weakref
  callbacks, finalizers) or in a `__del__`/weakref callback."""
  if _in_gc[0]:
    return True
  depth = 0
  while frame is not None and depth < 64:
    code = frame.f_code
    if (code.co_filename.endswith('weakref.py')
        or code.co_name in ('__del__', '_remove_dead_weakref')):
      return True
    frame, depth = frame.f_back, depth + 1
  return False


def _redeliver(signum: int, delay: float = 0.05) -> None:
  """Runs the signal's handler again in the main thread after `delay`."""
  import _thread  # pylint: disable=g-import-not-at-top

  def later():
    time.sleep(delay)
    _thread.interrupt_main(signum)

  threading.Thread(target=later, daemon=True).start()


def _raise_interrupted(signum, frame):
  if _critical['received'] is None:
    _critical['received'] = signum
  if _critical['depth'] > 0:
    _critical['pending'] = signum  # Raised when the critical section ends.
    return
  if _unsafe_to_raise(frame):
    _redeliver(signum)
    return
  raise Interrupted(signum)


def interrupt_received() -> Optional[int]:
  """The first signal `install_interrupt_handlers`' handlers received (None:
  none), even when its exception was swallowed somewhere."""
  return _critical['received']


def clear_interrupt() -> None:
  """Forgets a received (and handled) interrupt."""
  _critical['received'] = _critical['pending'] = None


def redeliver_interrupt() -> None:
  """Raises the received interrupt again in the main thread (from a thread,
  when the first one was swallowed)."""
  if _critical['received'] is not None:
    _redeliver(_critical['received'], 0.0)


def install_interrupt_handlers() -> list[int]:
  """Makes SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread
  (call it before opening an `ExecutionContext`, whose handlers then stop the
  workers first). A signal that is ignored (e.g. SIGINT of a background job,
  SIGHUP under nohup) stays ignored. Returns the signals now handled."""
  handled = []
  clear_interrupt()
  if threading.current_thread() is not threading.main_thread():
    return handled
  if _gc_start not in gc.callbacks:
    gc.callbacks.insert(0, _gc_start)  # Before every other callback,
    gc.callbacks.append(_gc_stop)      # and after those registered so far.
  for signum in INTERRUPT_SIGNALS:
    if signal.getsignal(signum) == signal.SIG_IGN:
      continue
    signal.signal(signum, _raise_interrupted)
    handled.append(int(signum))
  return handled


class critical_section:  # pylint: disable=invalid-name
  """Defers `Interrupted` (from `install_interrupt_handlers`' handlers) to the
  end of the block, so a checkpoint write is never cut short."""

  def __enter__(self):
    _critical['depth'] += 1
    return self

  def __exit__(self, *exc_info):
    _critical['depth'] -= 1
    if _critical['depth'] == 0 and _critical['pending'] is not None:
      signum, _critical['pending'] = _critical['pending'], None
      if exc_info[0] is None:
        raise Interrupted(signum)
    return False
