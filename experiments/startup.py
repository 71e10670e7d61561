"""What a binary does before importing TensorFlow (which takes seconds).

`begin()` is the first thing every binary runs: it installs the run's
signal handler (`perfed_tff.program.interrupts`, the one place signals are
installed), so that a SIGINT, SIGTERM or SIGHUP during start-up prints one
line and exits with 128 + the signal number instead of a KeyboardInterrupt
traceback from inside an import (`main` then calls `interrupts.start()`);
signals that were ignored when the process started (a background job) stay
ignored. At exit, TFF's own default context (made when TFF is imported) is
released while the interpreter is whole (`release_tff_context`), so its
worker is stopped and its finalizer prints nothing at teardown. Imports no
TensorFlow.
"""

import atexit
import gc
import os
import sys


def release_tff_context() -> None:
  """Replaces TFF's current context by one that runs nothing and collects
  the old one now: TFF's own default context holds a worker manager whose
  finalizer stops its `worker_binary` (and fails, "Exception ignored in
  ServiceManager.__del__", when it only runs at interpreter teardown). The
  owned runtime's workers are stopped by their own exit hook. Nothing to
  do (and no collection to pay for) while no `worker_binary` child of this
  process runs."""
  if 'tensorflow_federated' not in sys.modules or not _worker_children():
    return
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  class _Ended(tff.framework.SyncContext):

    def invoke(self, comp, arg):
      raise RuntimeError('the program has ended')

  tff.framework.set_default_context(_Ended())
  gc.collect()


def _worker_children() -> list[int]:
  """The pids of this process's `worker_binary` children (Linux /proc;
  where it cannot be read, every process is taken to have some)."""
  me, found = os.getpid(), []
  try:
    names = os.listdir('/proc')
  except OSError:
    return [-1]
  for name in names:
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat') as f:
        stat = f.read()
    except OSError:
      continue
    command, _, rest = stat.partition('(')[2].rpartition(')')
    fields = rest.split()
    if command == 'worker_binary' and fields[1:2] == [str(me)] and (
        fields[0] != 'Z'):
      found.append(int(name))
  return found


def begin() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from perfed_tff.program import interrupts  # pylint: disable=g-import-not-at-top
  interrupts.install_interrupt_handlers(starting=True)
  atexit.register(release_tff_context)
