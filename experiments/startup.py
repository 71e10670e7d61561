"""What a binary does before importing TensorFlow (which takes seconds).

`exit_quietly_on_signals()` makes SIGINT, SIGTERM and SIGHUP during start-up
print one line and exit with 128 + the signal number, instead of a
KeyboardInterrupt traceback from inside the import; the run's own handlers
(`experiments.cli`) replace these once the program starts. Signals that were
ignored when the process started (a background job) stay ignored. At exit,
TFF's own default context (made when TFF is imported) is released while the
interpreter is whole, so its finalizer prints nothing at teardown. Imports no
TensorFlow.
"""

import atexit
import os
import signal
import sys


def _exit_on_signal(signum, frame):
  """Until main() installs the run's handlers: nothing was written yet."""
  del frame
  name = signal.Signals(signum).name
  os.write(2, f'{os.path.basename(sys.argv[0])}: error: {name} during '
              'start-up; nothing was written.\n'.encode())
  os._exit(128 + signum)  # pylint: disable=protected-access


def release_tff_context():
  """At exit, before interpreter teardown (registered by
  `exit_quietly_on_signals`). Not needed when the process leaves with
  `os._exit` (`experiments.cli.exit_now`): there is no teardown."""
  if 'tensorflow_federated' in sys.modules:
    from perfed_tff.runtime import execution  # pylint: disable=g-import-not-at-top
    execution.release_tff_default_context()


def exit_quietly_on_signals() -> None:
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(signum) != signal.SIG_IGN:
      signal.signal(signum, _exit_on_signal)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  atexit.register(release_tff_context)


def start_local_worker_early(argv) -> None:
  """Starts the run's local TFF worker now, so that its start (about a
  second) overlaps TensorFlow's import; the run's `ExecutionContext`
  adopts it (`perfed_tff.runtime.local_worker.start_early`). Not when the
  command names remote `--workers` or asks for help. Imports no
  TensorFlow."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith(('-h', '--help')):
      return
    if arg == '--workers' and i + 1 < len(args) and args[i + 1]:
      return
    if arg.startswith('--workers=') and arg != '--workers=':
      return
  from perfed_tff.runtime import local_worker  # pylint: disable=g-import-not-at-top
  local_worker.start_early(os.cpu_count() or -1)
