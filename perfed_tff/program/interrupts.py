"""Interrupts of a run: SIGINT, SIGTERM and SIGHUP, installed in one place.

`install_interrupt_handlers()` (the binaries call it first thing, before
TensorFlow loads) installs one handler for the three signals. What it does
depends on where the process is:

* before `start()` (imports, flag parsing: nothing was written yet), it
  prints one line and exits with 128 + the signal number;
* inside a `critical_section()` (a checkpoint being written), it defers the
  signal to the end of the section, which then raises `Interrupted`;
* while a stop hook is registered (`stop_hook`: the owned runtime's
  supervisor registers one while a run's phases talk to its workers), it
  calls the hook, which ends the calls in flight; the error they raise is
  reported as the interrupt (`interrupt_received`);
* otherwise it raises `Interrupted` (a `KeyboardInterrupt` with
  `exit_status` = 128 + signum) in the main thread.

`interrupt_received()` tells a signal that arrived even when its exception
was swallowed on the way (the training loop asks it between rounds). A
signal that was ignored when the process started (SIGINT of a background
job, SIGHUP under nohup) stays ignored. Imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Optional


class Interrupted(KeyboardInterrupt):
  """SIGINT, SIGTERM or SIGHUP, raised in the main thread by the handler of
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
_state = {'depth': 0, 'pending': None, 'received': None, 'started': True}
_hooks: list[Callable[[int], None]] = []


def _handle(signum, frame):
  del frame
  if not _state['started']:
    name = signal.Signals(signum).name
    os.write(2, f'{os.path.basename(sys.argv[0])}: error: {name} during '
                'start-up; nothing was written.\n'.encode())
    os._exit(128 + signum)  # pylint: disable=protected-access
  if _state['received'] is None:
    _state['received'] = signum
  if _state['depth'] > 0:
    _state['pending'] = signum  # Raised when the critical section ends.
    return
  if _hooks:
    for hook in list(_hooks):
      hook(signum)
    return
  raise Interrupted(signum)


def install_interrupt_handlers(*, starting: bool = False) -> list[int]:
  """Makes SIGINT, SIGTERM and SIGHUP reach the run as described in the
  module docstring. `starting`: the process has not started its work yet
  (a signal exits quietly until `start()`). A signal that is ignored stays
  ignored. Returns the signals now handled (none outside the main
  thread)."""
  handled = []
  clear_interrupt()
  _state['started'] = not starting
  if threading.current_thread() is not threading.main_thread():
    return handled
  for signum in INTERRUPT_SIGNALS:
    if signal.getsignal(signum) == signal.SIG_IGN:
      continue
    signal.signal(signum, _handle)
    handled.append(int(signum))
  return handled


def start() -> None:
  """The process starts its work: signals now interrupt it (they exited
  quietly before, with `install_interrupt_handlers(starting=True)`)."""
  _state['started'] = True


def interrupt_received() -> Optional[int]:
  """The first signal the handler received since it was installed or
  cleared (None: none), even when its exception was swallowed somewhere."""
  return _state['received']


def clear_interrupt() -> None:
  """Forgets a received (and handled) interrupt."""
  _state['received'] = _state['pending'] = None


@contextlib.contextmanager
def stop_hook(hook: Callable[[int], None]):
  """While the block runs, a signal calls `hook(signum)` (from the main
  thread, between bytecodes: it must return at once) instead of raising."""
  _hooks.append(hook)
  try:
    yield
  finally:
    _hooks.remove(hook)


class critical_section:  # pylint: disable=invalid-name
  """Defers the handler's `Interrupted` to the end of the block, so a
  checkpoint write is never cut short."""

  def __enter__(self):
    _state['depth'] += 1
    return self

  def __exit__(self, *exc_info):
    _state['depth'] -= 1
    if _state['depth'] == 0 and _state['pending'] is not None:
      signum, _state['pending'] = _state['pending'], None
      if exc_info[0] is None:
        raise Interrupted(signum)
    return False
