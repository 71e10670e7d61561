"""The `worker_binary` processes this library starts, and their lifetime.

TFF's default C++ context starts `tensorflow_federated/data/worker_binary` as
a child that inherits the parent's stdout/stderr and is killed only when its
Python manager is garbage collected; such a child can outlive the interpreter
and keep a pipe open. A `WorkerProcess` instead sends the worker's output to
a log file, makes it die with its parent (Linux `PR_SET_PDEATHSIG`, even on
SIGKILL), and is stopped at interpreter exit (`register_exit_stop`) and by
`stop()`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from typing import Optional

import portpicker

from perfed_tff.runtime import listeners
from perfed_tff.runtime import loopback
from perfed_tff.runtime.worker import worker_binary_path

_PR_SET_PDEATHSIG = 1


def _die_with_parent():  # Runs in the child between fork and exec.
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except OSError:  # Not Linux: atexit and signal handlers still apply.
    pass
  _default_signals()


def _default_signals():
  # An ignored signal stays ignored across exec: a parent started with
  # SIGINT ignored must still be able to stop its worker with SIGINT.
  # (libc, not `signal.signal`: Popen may run outside the main thread.)
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      libc.signal(int(signum), 0)  # 0: SIG_DFL
  except OSError:
    pass


_LOG_PREFIX = 'tff_worker_'


def remove_stale_logs(directory: Optional[str] = None) -> list[str]:
  """Removes this user's temporary worker logs left by trainers that no
  longer run (`tff_worker_<trainer pid>_*.log`: a trainer killed by
  SIGKILL cannot delete its worker's log); returns their paths."""
  directory = directory or tempfile.gettempdir()
  removed = []
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    if not (name.startswith(_LOG_PREFIX) and name.endswith('.log')):
      continue
    owner = name[len(_LOG_PREFIX):].split('_', 1)[0]
    path = os.path.join(directory, name)
    try:
      if (not owner.isdigit() or _alive(int(owner))
          or os.lstat(path).st_uid != os.getuid()):
        continue
      os.remove(path)
      removed.append(path)
    except OSError:
      pass
  return removed


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkerProcess:
  """One `worker_binary` process serving TFF's executor service on a port.

  Args:
    port: TCP port to serve on; a free one is picked when `None`.
    max_concurrent_computation_calls: TFF's limit on concurrent calls of one
      computation inside the worker (clients run in parallel up to this);
      nonpositive means unlimited.
    log_path: file for the worker's output; a temporary file when `None`
      (deleted by `stop()`; copy it first with `keep_log` to keep it).
    die_with_parent: stop the worker when this Python process dies.
    listen: 'loopback' (default: $PERFED_TFF_WORKER_LISTEN, else
      'loopback'): the worker listens on 127.0.0.1 only (`loopback`; raises
      `loopback.WorkerExposureError` where that cannot be ensured); 'all':
      on every interface, as TFF starts it (anyone who can reach this
      machine can run TensorFlow graphs in it).

  The worker runs in its own session, so a Ctrl-C on the terminal reaches
  only the Python process, which decides (an ignored SIGINT stays ignored
  and leaves the worker running).
  """

  def __init__(
      self,
      port: Optional[int] = None,
      *,
      max_concurrent_computation_calls: int = -1,
      log_path: Optional[str] = None,
      die_with_parent: bool = True,
      listen: Optional[str] = None,
  ):
    self.listen = loopback.listen_setting(listen)
    env = loopback.worker_env(self.listen)  # Refuses before anything starts.
    self._confined = self.listen != 'loopback'
    self.port = port or portpicker.pick_unused_port()
    self.max_concurrent_computation_calls = max_concurrent_computation_calls
    self._temporary_log = log_path is None
    if log_path is None:
      remove_stale_logs()
      fd, log_path = tempfile.mkstemp(prefix=f'{_LOG_PREFIX}{os.getpid()}_',
                                      suffix='.log')
      os.close(fd)
    self.log_path = log_path
    self._log = open(log_path, 'ab')
    args = [
        worker_binary_path(),
        f'--port={self.port}',
        f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
    ]
    self.process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=self._log,
        stderr=subprocess.STDOUT,
        close_fds=True,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent else _default_signals,
        env=env,
    )
    _LIVE_WORKERS.add(self)

  def check_confined(self) -> None:
    """Once the worker answers: raises `loopback.WorkerExposureError`, after
    killing it, if a worker started loopback-only listens beyond loopback."""
    if self._confined or not self.running():
      return
    try:
      listeners.check_listeners(
          self.pid, f'the local TFF worker (pid {self.pid})',
          accept=f'set {loopback.LISTEN_ENV}=all')
    except loopback.WorkerExposureError:
      self.kill()
      raise
    self._confined = True

  @property
  def pid(self) -> int:
    return self.process.pid

  @property
  def address(self) -> str:
    return f'localhost:{self.port}'

  def running(self) -> bool:
    return self.process.poll() is None

  def frozen(self) -> bool:
    """Whether the process is stopped (SIGSTOP, SIGTSTP, a debugger)."""
    try:
      with open(f'/proc/{self.pid}/stat') as f:
        state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
      return False
    return state in ('T', 't')

  def kill(self) -> None:
    """SIGKILL (a stopped process dies too) and reap."""
    if self.process.poll() is None:
      try:
        self.process.kill()
        self.process.send_signal(signal.SIGCONT)
      except ProcessLookupError:
        pass
      self.process.wait()

  def keep_log(self, path: str) -> Optional[str]:
    """Copies the worker's log to `path` (for a failed run); returns `path`,
    or None when there is nothing to copy."""
    try:
      if not self._log.closed:
        self._log.flush()
      if os.path.getsize(self.log_path) == 0:
        return None
      shutil.copyfile(self.log_path, path)
      return path
    except OSError:
      return None

  def stop(self, timeout: float = 10.0) -> None:
    """Stops the worker (SIGINT, then SIGKILL after `timeout` seconds) and
    deletes its temporary log."""
    if self.process.poll() is None:
      try:
        if self.frozen():
          raise subprocess.TimeoutExpired(self.process.args, 0)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        self.kill()
      except ProcessLookupError:
        pass
    if not self._log.closed:
      self._log.close()
    if self._temporary_log:
      try:
        os.remove(self.log_path)
      except OSError:
        pass
    _LIVE_WORKERS.discard(self)


_LIVE_WORKERS: set[WorkerProcess] = set()
_EXIT_STOP = []


def stop_all_workers() -> None:
  """Stops every worker this process started and has not stopped yet."""
  for worker in list(_LIVE_WORKERS):
    worker.stop(timeout=5.0)


def register_exit_stop() -> None:
  """Stops the workers at interpreter exit (once registered, it stays).
  A signal's default action ends this process without that; the workers
  then die with it (`PR_SET_PDEATHSIG`)."""
  if not _EXIT_STOP:
    _EXIT_STOP.append(True)
    atexit.register(stop_all_workers)
