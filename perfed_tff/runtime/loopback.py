"""Keeps TFF's `worker_binary` reachable from this machine only.

The worker serves TFF's executor service on `[::]:PORT` (every interface,
no flag to choose) and runs any TensorFlow graph it is sent, file reads and
writes included, without authentication. A worker this library starts (and
`python -m perfed_tff.runtime.worker` unless `--listen=all`) therefore runs
with `loopback_shim.c` preloaded (`LD_PRELOAD`): its `bind()` turns a
wildcard address into loopback, so the worker listens on 127.0.0.1 only.

The shim is compiled on first use with the system C compiler (`$CC`, `cc`,
`gcc` or `clang`) into `$XDG_CACHE_HOME/perfed_tff` (default
`~/.cache/perfed_tff`), keyed by the hash of its source, written atomically
and checked once by binding a wildcard socket under it. Where it cannot be
built, a loopback-only worker is refused (`WorkerExposureError`, one line,
exit 2 in the binaries) unless exposure is accepted explicitly: the
environment variable `PERFED_TFF_WORKER_LISTEN=all` for a local worker,
`--listen=all` for the launcher. After the worker answers, its listening
sockets are read from `/proc` (`perfed_tff.runtime.listeners`): a worker
listening beyond loopback although started loopback-only is killed and
refused the same way.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Mapping, Optional

from perfed_tff import checks
from perfed_tff.runtime import user_cache

LISTEN_ENV = 'PERFED_TFF_WORKER_LISTEN'
LISTEN_CHOICES = ('loopback', 'all')
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'loopback_shim.c')
LOOPBACK_ADDRESS = '127.0.0.1'  # Where a loopback-only worker listens.


class SettingError(checks.ArgumentError):
  """A refused worker setting, as one whole line (no `--flag:` prefix): the
  binaries print it and exit 2."""

  def __init__(self, message: str, name: str = 'workers'):
    ValueError.__init__(self, message)  # pylint: disable=non-parent-init-called
    self.name = name
    self.reason = message

  @property
  def flag_message(self) -> str:
    return self.reason


class WorkerExposureError(SettingError):
  """A worker would listen (or listens) beyond loopback without the user's
  explicit consent; the message names the fixes."""


class ShimUnavailable(RuntimeError):
  """The shim cannot be built or does not take effect here (why, one line)."""


def listen_setting(value: Optional[str] = None) -> str:
  """'loopback' or 'all': `value`, else $PERFED_TFF_WORKER_LISTEN, else
  'loopback'."""
  source = '`listen`'
  if value is None:
    value = os.environ.get(LISTEN_ENV) or 'loopback'
    source = f'${LISTEN_ENV}'
  value = str(value).strip().lower()
  if value not in LISTEN_CHOICES:
    raise SettingError(f'{source} must be one of '
                       f'{", ".join(LISTEN_CHOICES)}, got {value!r}', 'listen')
  return value


# ---------------------------------------------------------------- the shim

_LOCK = threading.Lock()
_BUILT: dict[str, str] = {}     # key -> path of a checked shim
_FAILED: dict[str, str] = {}    # key -> why it cannot be built

# Run under LD_PRELOAD=shim: wildcard binds must come out on loopback.
_SELF_TEST = r'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(('', 0)); print(s.getsockname()[0])
try:
  t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
  t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
  t.bind(('::', 0)); print(t.getsockname()[0])
except OSError:
  print('-')
'''


def _compiler() -> Optional[list[str]]:
  cc = os.environ.get('CC', '').split()
  if cc:
    path = shutil.which(cc[0])
    return [path] + cc[1:] if path else None
  for name in ('cc', 'gcc', 'clang'):
    path = shutil.which(name)
    if path:
      return [path]
  return None


def _safe_path(path: str) -> bool:
  """Owned by us, writable by nobody else (a preloaded library runs with
  the worker's rights), and usable in LD_PRELOAD (no space or colon)."""
  if any(c in path for c in ' \t\n:'):
    return False
  return user_cache.is_private(path)


def _cache_dirs() -> list[str]:
  return [user_cache.base_dir()]


def _private_dir() -> str:
  path = tempfile.mkdtemp(prefix='perfed_tff_shim_')
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def _usable_dir(path: str) -> bool:
  return user_cache.usable_dir(path) and _safe_path(path)


def _self_test(path: str) -> Optional[str]:
  """None if wildcard binds under `path` come out on loopback; else why."""
  env = dict(os.environ, LD_PRELOAD=path)
  try:
    r = subprocess.run([sys.executable, '-S', '-c', _SELF_TEST], env=env,
                       capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
  except (OSError, subprocess.SubprocessError) as e:
    return f'its check did not run ({e})'
  got = r.stdout.split()
  if r.returncode != 0 or len(got) != 2:
    line = (r.stderr.strip().splitlines() or ['no output'])[-1]
    return f'its check failed ({line[:200]})'
  if got[0] != '127.0.0.1' or got[1] not in ('::ffff:127.0.0.1', '-'):
    return (f'it did not take effect (a wildcard bind came out on '
            f'{" and ".join(got)})')
  return None


def _compile(compiler: list[str], directory: str, name: str) -> str:
  """Compiles the shim into `directory/name` atomically; returns the path."""
  fd, tmp = tempfile.mkstemp(prefix='.build_', suffix='.so', dir=directory)
  os.close(fd)
  try:
    error = ''
    for libs in (['-ldl'], []):  # glibc < 2.34 keeps dlsym in libdl.
      r = subprocess.run(
          compiler + ['-shared', '-fPIC', '-O2', '-o', tmp, SOURCE] + libs,
          capture_output=True, text=True, timeout=120,
          stdin=subprocess.DEVNULL)
      if r.returncode == 0:
        break
      error = (r.stderr.strip().splitlines() or
               [f'exit status {r.returncode}'])[0][:200]
    else:
      raise ShimUnavailable(f'{compiler[0]} failed to build {SOURCE}: '
                            f'{error}')
    os.chmod(tmp, 0o755)
    why = _self_test(tmp)
    if why:
      raise ShimUnavailable(f'the shim built by {compiler[0]} is unusable: '
                            f'{why}')
    path = os.path.join(directory, name)
    os.replace(tmp, path)
    return path
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def shim_file_name() -> str:
  """The shim's file name in the cache: keyed by its source and machine."""
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
  return f'loopback_shim-{key}.so'


def shim_path() -> str:
  """The path of the built, checked shim (built on first call).

  Raises:
    ShimUnavailable: not Linux, no C compiler, or the shim does not work.
  """
  if not sys.platform.startswith('linux'):
    raise ShimUnavailable(f'LD_PRELOAD confinement needs Linux, not '
                          f'{sys.platform}')
  name = shim_file_name()
  key = name
  with _LOCK:
    if key in _BUILT:
      return _BUILT[key]
    if key in _FAILED:
      raise ShimUnavailable(_FAILED[key])
    try:
      directories = [d for d in _cache_dirs() if _usable_dir(d)]
      for directory in directories:
        path = os.path.join(directory, name)
        if _safe_path(path):
          _BUILT[key] = path
          return path
      compiler = _compiler()
      if compiler is None:
        raise ShimUnavailable('no C compiler (cc, gcc or clang; or $CC) to '
                              'build its loopback shim')
      directory = directories[0] if directories else _private_dir()
      _BUILT[key] = _compile(compiler, directory, name)
      return _BUILT[key]
    except ShimUnavailable as e:
      _FAILED[key] = str(e)
      raise
    except (OSError, subprocess.SubprocessError) as e:
      _FAILED[key] = f'its loopback shim could not be built ({e})'
      raise ShimUnavailable(_FAILED[key]) from None


def preload_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """`base` (default: this process's environment) with the shim first in
  LD_PRELOAD. Raises ShimUnavailable."""
  env = dict(os.environ if base is None else base)
  path = shim_path()
  others = [p for p in env.get('LD_PRELOAD', '').replace(':', ' ').split()
            if p != path]
  env['LD_PRELOAD'] = ' '.join([path] + others)
  return env


def worker_env(listen: str, *, who: str = 'the local TFF worker',
               accept: str = f'set {LISTEN_ENV}=all') -> dict[str, str]:
  """The environment to start a worker in: with the shim preloaded for
  'loopback', this process's own for 'all'.

  Raises:
    WorkerExposureError: 'loopback' and the shim is unavailable; the message
      names the fixes (a C compiler, or `accept`).
  """
  if listen == 'all':
    return dict(os.environ)
  try:
    return preload_env()
  except ShimUnavailable as e:
    raise WorkerExposureError(
        f'cannot keep {who} on loopback: {e}; without it the worker would '
        'run TensorFlow graphs (file reads and writes included) sent by '
        'anyone who can reach this machine. Install a C compiler (e.g. '
        f'`apt-get install gcc`), or {accept} to accept that exposure.'
    ) from None
