r"""Serves TFF's C++ executor service (`worker_binary`) on this host.

  python -m perfed_tff.runtime.worker --port=8000

runs the `worker_binary` shipped in the tensorflow-federated wheel in place of
this Python process (exec: signals, exit status and output are the worker's
own). Start one per machine, then train with
`experiments/train.py --workers=host1:8000,host2:8000`: each round's clients
are split across the workers by TFF's mergeable-computation context.
The service is unauthenticated gRPC that runs any TensorFlow graph it is
sent: by default the worker listens on loopback only (127.0.0.1; reach it
over an SSH tunnel), `--listen=all` makes it listen on every interface, for
a private network only (README, "Trust model"). The first line on stderr
says which.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import socket
import sys

from absl import app
from absl import flags

from perfed_tff.runtime import listeners
from perfed_tff.runtime import loopback



def worker_binary_path() -> str:
  """The wheel's `worker_binary`, found without importing TensorFlow."""
  spec = importlib.util.find_spec('tensorflow_federated')
  if spec is None or spec.origin is None:
    raise RuntimeError('tensorflow-federated is not installed for '
                       f'{sys.executable}')
  path = os.path.join(os.path.dirname(spec.origin), 'data', 'worker_binary')
  if not os.access(path, os.X_OK):
    raise RuntimeError(f'TFF worker binary not found (or not executable) at '
                       f'{path}')
  return path


def worker_command(port: int, max_concurrent_computation_calls: int = -1
                   ) -> list[str]:
  if not 0 < port < 65536:
    raise ValueError(f'--port: must be an integer in 1..65535, got {port}')
  return [worker_binary_path(), f'--port={port}',
          f'--max_concurrent_computation_calls={max_concurrent_computation_calls}']


def port_in_use(port: int) -> bool:
  """Whether something already listens on `port` (any address). gRPC binds
  with SO_REUSEPORT, so a second worker would share the port silently."""
  for family, address in ((socket.AF_INET6, '::'), (socket.AF_INET, '')):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # No IPv6 here.
    try:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      sock.bind((address, port))
      return False
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return True
    finally:
      sock.close()
  return False


def _define_flags():
  """The binary's flags (defined only when run as a program)."""
  global _PORT, _MAX_CALLS, _LISTEN
  _PORT = flags.DEFINE_integer('port', None, 'TCP port to serve on (1-65535).')
  _LISTEN = flags.DEFINE_enum(
      'listen', 'loopback', loopback.LISTEN_CHOICES,
      'loopback: listen on 127.0.0.1 only (other machines reach it over an '
      'SSH tunnel); all: on every interface, where anyone who can reach '
      'this machine can run TensorFlow graphs in the worker.')
  _MAX_CALLS = flags.DEFINE_integer(
      'max_concurrent_computation_calls', -1,
      'Most parallel calls of one computation (clients run in parallel up to '
      'this); <= 0: unlimited.')


def _fail(message: str) -> None:
  print(f'worker: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _flag_error(error: Exception) -> str:
  """absl's flag error as one line naming the flag (`--port: ...`)."""
  line = (str(error).splitlines() or [type(error).__name__])[0]
  match = re.match(r'flag --(\w+)=(.*?): ', line)
  if match and match.group(1) == 'port':
    return f'--port: must be an integer in 1..65535, got {match.group(2)!r}'
  if match:
    return f'--{match.group(1)}: {line[match.end():]}'
  return line


def parse_flags(argv):
  """absl's parser whose errors are one line and exit 2 (not absl's
  `FATAL Flags parsing error` and exit 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error(e))


def main(argv):
  if len(argv) > 1:
    print(f'worker: error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  if _PORT.value is None:
    print('worker: error: --port: required (1..65535)', file=sys.stderr)
    sys.exit(2)
  try:
    command = worker_command(_PORT.value, _MAX_CALLS.value)
  except (ValueError, RuntimeError) as e:
    print(f'worker: error: {e}', file=sys.stderr)
    sys.exit(2)
  if port_in_use(_PORT.value):
    print(f'worker: error: --port: port {_PORT.value} is already in use (is '
          'a worker already running there?)', file=sys.stderr)
    sys.exit(2)
  listen, pid = _LISTEN.value, os.getpid()
  try:
    env = loopback.worker_env(listen, who='the worker',
                              accept='pass --listen=all')
  except loopback.WorkerExposureError as e:
    _fail(f'--listen=loopback: {e.reason}')
  print(f'TFF worker (pid {pid}) {listeners.describe(listen, _PORT.value)}',
        file=sys.stderr, flush=True)
  if listen == 'loopback':  # Verifies it once it listens (kills if exposed).
    listeners.spawn_watcher(pid, f'the TFF worker (pid {pid})',
                           accept='pass --listen=all', program='worker')
  os.execve(command[0], command, env)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
