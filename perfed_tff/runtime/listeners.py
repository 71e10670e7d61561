"""What a worker listens on, read from `/proc` (Linux): its TCP sockets,
whether they are loopback only (`check_listeners`, which refuses a worker
started loopback-only that listens beyond it: `loopback.WorkerExposureError`),
a watcher that does the same for a worker started elsewhere, and the line a
worker's launcher prints about its addresses (`describe`)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import time
from typing import Optional, Sequence

from perfed_tff.runtime.loopback import LOOPBACK_ADDRESS
from perfed_tff.runtime.loopback import WorkerExposureError


def _socket_inodes(pid: int) -> set[str]:
  inodes = set()
  fd_dir = f'/proc/{pid}/fd'
  for fd in os.listdir(fd_dir):
    try:
      link = os.readlink(os.path.join(fd_dir, fd))
    except OSError:
      continue
    if link.startswith('socket:['):
      inodes.add(link[8:-1])
  return inodes


def _address(hex_address: str) -> str:
  """An address of /proc/net/tcp{,6} as text ('::ffff:127.0.0.1' as `ss`
  and inet_ntop write it)."""
  raw = bytes.fromhex(hex_address)
  # /proc prints each 32-bit word in host byte order.
  words = [raw[i:i + 4][::-1] if sys.byteorder == 'little' else raw[i:i + 4]
           for i in range(0, len(raw), 4)]
  ip = ipaddress.ip_address(b''.join(words))
  mapped = getattr(ip, 'ipv4_mapped', None)
  return f'::ffff:{mapped}' if mapped is not None else str(ip)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
  """(address, port) of every TCP socket process `pid` listens on, read
  from /proc (Linux). Raises OSError when /proc cannot tell."""
  inodes = _socket_inodes(pid)
  found = []
  for table in ('tcp', 'tcp6'):
    try:
      with open(f'/proc/{pid}/net/{table}') as f:
        lines = f.read().splitlines()[1:]
    except FileNotFoundError:
      continue  # No IPv6 here.
    for line in lines:
      fields = line.split()
      if len(fields) < 10 or fields[3] != '0A' or fields[9] not in inodes:
        continue  # 0A: TCP_LISTEN.
      address, port = fields[1].split(':')
      found.append((_address(address), int(port, 16)))
  return found


def is_loopback(address: str) -> bool:
  ip = ipaddress.ip_address(address.split('%')[0])
  mapped = getattr(ip, 'ipv4_mapped', None)
  return (mapped or ip).is_loopback


def beyond_loopback(sockets: Sequence[tuple[str, int]]) -> list[str]:
  """'address:port' of the sockets not on loopback ([::] and 0.0.0.0
  included)."""
  return [f'[{a}]:{p}' if ':' in a else f'{a}:{p}'
          for a, p in sockets if not is_loopback(a)]


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
  except (OSError, IndexError):
    return False


def wait_listening(pid: int, timeout: float,
                   poll: float = 0.02) -> Optional[list[tuple[str, int]]]:
  """The sockets `pid` listens on, as soon as there is one; None when it
  exits, when `timeout` passes first or when /proc cannot tell."""
  deadline = time.monotonic() + timeout
  while _alive(pid):
    try:
      sockets = listening_sockets(pid)
    except OSError:  # E.g. during its exec; gone, or /proc is closed to us.
      sockets = None
    if sockets:
      return sockets
    if time.monotonic() > deadline:
      return None
    time.sleep(poll)
  return None


def check_listeners(pid: int, who: str, accept: str,
                    timeout: float = 5.0) -> None:
  """Raises WorkerExposureError when process `pid` (a worker started
  loopback-only, now answering) listens beyond loopback. No verdict (None
  from `wait_listening`) passes: the shim was checked when it was built."""
  sockets = wait_listening(pid, timeout)
  exposed = beyond_loopback(sockets or [])
  if exposed:
    raise WorkerExposureError(
        f'{who} listens beyond loopback on {", ".join(exposed)} although it '
        'was started loopback-only (was its LD_PRELOAD shim ignored?); '
        f'stopped it. Run it where the shim works, or {accept} to accept '
        'that exposure.')


def spawn_watcher(pid: int, who: str, accept: str, program: str,
                  timeout: float = 300.0) -> None:
  """Forks a detached process that waits until process `pid` (about to exec
  a loopback-only worker) listens; if it listens beyond loopback, the
  watcher SIGKILLs it and prints `<program>: error: <why>` on stderr. It
  ends at the verdict, when `pid` exits or after `timeout` seconds."""
  try:
    child = os.fork()
  except OSError:
    return
  if child:
    os.waitpid(child, 0)  # The watcher is its child: nothing to reap later.
    return
  try:  # pylint: disable=too-many-try-statements
    os.setsid()
    if os.fork():
      os._exit(0)  # pylint: disable=protected-access
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    try:
      check_listeners(pid, who, accept, timeout)
    except WorkerExposureError as e:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
      os.write(2, f'{program}: error: {e.reason}\n'.encode())
  except BaseException:  # pylint: disable=broad-except
    pass
  os._exit(0)  # pylint: disable=protected-access


# ------------------------------------------------------ the launcher's line

def interface_addresses() -> list[str]:
  """This machine's non-loopback IP addresses (Linux; best effort)."""
  found = []
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
    import struct  # pylint: disable=g-import-not-at-top
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      for _, name in socket.if_nameindex():
        try:
          request = struct.pack('256s', name.encode()[:15])
          reply = fcntl.ioctl(s.fileno(), 0x8915, request)  # SIOCGIFADDR
          found.append(socket.inet_ntoa(reply[20:24]))
        except OSError:
          continue
  except (ImportError, OSError):
    pass
  try:
    with open('/proc/net/if_inet6') as f:
      for line in f:
        fields = line.split()
        address = str(ipaddress.ip_address(bytes.fromhex(fields[0])))
        if address.startswith('fe80:'):
          address += f'%{fields[5]}'
        found.append(address)
  except (OSError, ValueError, IndexError):
    pass
  return [a for a in dict.fromkeys(found) if not is_loopback(a)]


def describe(listen: str, port: int) -> str:
  """What a worker on `port` exposes, as one line."""
  if listen == 'loopback':
    return (f'listening on {LOOPBACK_ADDRESS} port {port} (loopback only: '
            'other machines cannot reach it; reach it over an SSH tunnel, '
            'see README "Trust model")')
  addresses = interface_addresses()
  user = _user()
  return (f'listening on all interfaces port {port} '
          f'({", ".join(addresses) or "no other address found"}): anyone who '
          'can reach them can run TensorFlow graphs here, reading and writing '
          f'files as user {user}')


def _user() -> str:
  try:
    import pwd  # pylint: disable=g-import-not-at-top
    return pwd.getpwuid(os.geteuid()).pw_name
  except (ImportError, KeyError):
    return str(os.geteuid())
