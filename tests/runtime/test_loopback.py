"""Workers that only the run can reach (`perfed_tff.runtime.loopback`).

A worker this library starts, and `python -m perfed_tff.runtime.worker`
unless `--listen=all`, listens on loopback only; where that cannot be
ensured the worker is refused with one line (exit 2). Traffic goes only to
loopback and to a network namespace the test makes itself.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid

import portpicker
import pytest

from perfed_tff.runtime import listeners
from perfed_tff.runtime import loopback
from tests import binary_helpers as h

_CC = loopback._compiler()  # pylint: disable=protected-access
needs_cc = pytest.mark.skipif(_CC is None, reason='no C compiler for the shim')


def _listeners(pid, timeout=60.0):
  sockets = listeners.wait_listening(pid, timeout)
  assert sockets, f'process {pid} did not start listening within {timeout}s'
  return sockets


def _ss_lines(pids):
  """`ss -ltnp` lines of the sockets of `pids` (None: no usable ss)."""
  if shutil.which('ss') is None:
    return None
  r = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True,
                     timeout=30)
  if r.returncode != 0:
    return None
  return [l for l in r.stdout.splitlines()
          if any(f'pid={p},' in l for p in pids)]


def _ss_address(line):
  """The local address of an `ss -ltn` line, without its port."""
  local = line.split()[3]
  address = local.rsplit(':', 1)[0].strip('[]')
  return address.split('%')[0]


def _start_worker(port, *flags, env=None):
  return subprocess.Popen(
      [sys.executable, '-m', 'perfed_tff.runtime.worker', f'--port={port}',
       *flags], env=env or h.env(), stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=h.ROOT)


def _stop(proc):
  if proc.poll() is None:
    proc.kill()
  proc.wait(timeout=30)
  if proc.stderr:
    proc.stderr.close()


# ------------------------------------------------------------ the pieces

def test_proc_addresses_and_loopback():
  assert str(listeners._address('0100007F')) == '127.0.0.1'  # pylint: disable=protected-access
  assert str(listeners._address('0000000000000000FFFF00000100007F')) == (  # pylint: disable=protected-access
      '::ffff:127.0.0.1')
  assert str(listeners._address('00000000000000000000000001000000')) == '::1'  # pylint: disable=protected-access
  assert listeners.beyond_loopback(
      [('127.0.0.1', 1), ('::1', 2), ('::ffff:127.0.0.1', 3), ('0.0.0.0', 4),
       ('::', 5), ('::ffff:0.0.0.0', 6), ('10.1.2.3', 7)]) == [
           '0.0.0.0:4', '[::]:5', '[::ffff:0.0.0.0]:6', '10.1.2.3:7']
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen()
    assert ('127.0.0.1', s.getsockname()[1]) in listeners.listening_sockets(
        os.getpid())


def test_listen_setting(monkeypatch):
  monkeypatch.delenv(loopback.LISTEN_ENV, raising=False)
  assert loopback.listen_setting() == 'loopback'
  assert loopback.listen_setting('ALL') == 'all'
  monkeypatch.setenv(loopback.LISTEN_ENV, 'everywhere')
  with pytest.raises(loopback.SettingError,
                     match=r"PERFED_TFF_WORKER_LISTEN must be one of "
                     r"loopback, all, got 'everywhere'"):
    loopback.listen_setting()


@needs_cc
def test_shim_turns_wildcard_binds_into_loopback(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setattr(loopback, '_BUILT', {})
  monkeypatch.setattr(loopback, '_FAILED', {})
  path = loopback.shim_path()
  assert path == str(tmp_path / 'perfed_tff' / loopback.shim_file_name())
  assert oct(os.stat(path).st_mode & 0o777) == '0o755'
  assert loopback._self_test(path) is None  # pylint: disable=protected-access
  assert loopback.shim_path() == path  # Cached.
  # Other addresses are left alone: a bind to ::1 stays on ::1.
  code = ('import socket; s = socket.socket(socket.AF_INET6); '
          's.bind(("::1", 0)); print(s.getsockname()[0])')
  r = subprocess.run([sys.executable, '-S', '-c', code],
                     env=dict(os.environ, LD_PRELOAD=path),
                     capture_output=True, text=True, timeout=60)
  if r.returncode == 0:  # (No IPv6 loopback here otherwise.)
    assert r.stdout.strip() == '::1'


# ------------------------------------------------ (1) a run's socket table

RUN_SCRIPT = textwrap.dedent('''
    import os, sys
    import numpy as np, psutil
    import tensorflow_federated as tff
    from perfed_tff import runtime
    runtime.ExecutionContext()
    @tff.tensorflow.computation(np.int32)
    def inc(x):
      return x + 1
    assert inc(41) == 42
    workers = [p.pid for p in psutil.Process().children()
               if 'worker_binary' in ' '.join(p.cmdline())]
    print('RUN', os.getpid(), *workers, flush=True)
    sys.stdin.read()  # Runs until the test closes stdin.
''')


def test_a_runs_worker_listens_on_loopback_only():
  env = h.env()
  env.pop(loopback.LISTEN_ENV, None)
  proc = subprocess.Popen([sys.executable, '-c', RUN_SCRIPT], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith('RUN'), proc.stderr.read()[-3000:]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 2, line  # The run and its one worker.
    worker_sockets = _listeners(pids[1])
    for pid in pids:
      sockets = listeners.listening_sockets(pid)
      assert not listeners.beyond_loopback(sockets), (pid, sockets)
    assert all(a in ('127.0.0.1', '::ffff:127.0.0.1')
               for a, _ in worker_sockets), worker_sockets
    lines = _ss_lines(pids)
    if lines is not None:  # The same seen by `ss -ltnp`.
      assert lines, 'ss shows no socket of the worker'
      for l in lines:
        assert listeners.is_loopback(_ss_address(l)), l
  finally:
    proc.stdin.close()
    proc.wait(timeout=120)
    proc.stdout.close()
    proc.stderr.close()


# ------------------------------------- (2) from a namespace the test made

def _ip(*args, check=True):
  return subprocess.run(['ip', *args], capture_output=True, text=True,
                        timeout=30, check=check)


def _connect_from(namespace, address, port):
  """'connected', or the errno name of a TCP connect from inside
  `namespace` to (address, port)."""
  code = textwrap.dedent(f'''
      import errno, socket, sys
      family = socket.AF_INET6 if ':' in {address!r} else socket.AF_INET
      s = socket.socket(family, socket.SOCK_STREAM)
      s.settimeout(10)
      try:
        s.connect(({address!r}, {port}))
        print('connected')
      except OSError as e:
        print(errno.errorcode.get(e.errno, type(e).__name__))
  ''')
  r = subprocess.run(['ip', 'netns', 'exec', namespace, sys.executable, '-S',
                      '-c', code], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip()


@pytest.fixture
def veth_namespace():
  """(namespace, host-side IPv4, host-side IPv6 or None): a private network
  namespace joined to this one by a veth pair on benchmarking addresses
  (198.18.0.0/15, RFC 2544) and a random unique-local IPv6 prefix."""
  if sys.platform != 'linux' or shutil.which('ip') is None:
    pytest.skip('needs Linux and iproute2 (`ip`)')
  if os.geteuid() != 0:
    pytest.skip('creating a network namespace and veth pair needs root')
  tag = uuid.uuid4().hex[:8]
  namespace, host_if, ns_if = f'pftff{tag}', f'pfh{tag}', f'pfn{tag}'
  octet = int(tag[:2], 16)
  host4, ns4 = f'198.18.{octet}.1', f'198.18.{octet}.2'
  prefix6 = f'fd{tag[2:4]}:{tag[4:8]}:{tag[:4]}::'
  host6, ns6 = prefix6 + '1', prefix6 + '2'
  if f'198.18.{octet}.' in _ip('-4', 'addr').stdout:
    pytest.skip(f'198.18.{octet}.0/30 is in use here')
  if _ip('netns', 'add', namespace, check=False).returncode != 0:
    pytest.skip('cannot create a network namespace here')
  try:
    made = _ip('link', 'add', host_if, 'type', 'veth', 'peer', 'name', ns_if,
               check=False)
    if made.returncode != 0:
      pytest.skip(f'cannot create a veth pair here: {made.stderr.strip()}')
    _ip('link', 'set', ns_if, 'netns', namespace)
    _ip('addr', 'add', f'{host4}/30', 'dev', host_if)
    _ip('link', 'set', host_if, 'up')
    _ip('-n', namespace, 'addr', 'add', f'{ns4}/30', 'dev', ns_if)
    _ip('-n', namespace, 'link', 'set', 'lo', 'up')
    _ip('-n', namespace, 'link', 'set', ns_if, 'up')
    v6 = (_ip('addr', 'add', f'{host6}/64', 'dev', host_if, 'nodad',
              check=False).returncode == 0 and
          _ip('-n', namespace, 'addr', 'add', f'{ns6}/64', 'dev', ns_if,
              'nodad', check=False).returncode == 0)
    yield namespace, host4, host6 if v6 else None
  finally:
    _ip('netns', 'del', namespace, check=False)  # Takes its veth end along.
    _ip('link', 'del', host_if, check=False)


def test_other_hosts_are_refused_unless_listen_all(veth_namespace):
  namespace, host4, host6 = veth_namespace
  addresses = [host4] + ([host6] if host6 else [])
  # The plumbing works: a listener on the host's veth address is reached.
  with socket.socket() as probe:
    probe.bind((host4, 0))
    probe.listen()
    assert _connect_from(namespace, host4, probe.getsockname()[1]) == (
        'connected')

  env = h.env()
  env.pop(loopback.LISTEN_ENV, None)
  port = portpicker.pick_unused_port()
  proc = _start_worker(port, env=env)
  try:
    _listeners(proc.pid)
    for address in addresses:
      assert _connect_from(namespace, address, port) == 'ECONNREFUSED', (
          address)
    # Loopback still reaches it.
    with socket.create_connection(('127.0.0.1', port), timeout=10):
      pass
  finally:
    _stop(proc)

  # The same worker with --listen=all is reached: the check can fail.
  port = portpicker.pick_unused_port()
  proc = _start_worker(port, '--listen=all', env=env)
  try:
    _listeners(proc.pid)
    for address in addresses:
      assert _connect_from(namespace, address, port) == 'connected', address
  finally:
    _stop(proc)


# -------------------------------------------------- (3) the launcher

def test_launcher_says_it_is_loopback_only():
  port = portpicker.pick_unused_port()
  proc = _start_worker(port)
  try:
    line = proc.stderr.readline().strip()
    assert re.fullmatch(
        rf'TFF worker \(pid {proc.pid}\) listening on 127\.0\.0\.1 port '
        rf'{port} \(loopback only: other machines cannot reach it; .*\)',
        line), line
    sockets = _listeners(proc.pid)
    assert not listeners.beyond_loopback(sockets), sockets
    assert (port in {p for _, p in sockets})
  finally:
    _stop(proc)


def test_launcher_names_what_listen_all_exposes():
  port = portpicker.pick_unused_port()
  proc = _start_worker(port, '--listen=all')
  try:
    line = proc.stderr.readline().strip()
  finally:
    _stop(proc)  # Listening on every interface for as short as possible.
  assert line.startswith(
      f'TFF worker (pid {proc.pid}) listening on all interfaces port {port} '
      '('), line
  assert line.endswith('anyone who can reach them can run TensorFlow graphs '
                       f'here, reading and writing files as user '
                       f'{listeners._user()}'), line  # pylint: disable=protected-access
  for address in listeners.interface_addresses():
    assert address in line


@pytest.mark.parametrize('value,line', [
    ('everywhere', 'worker: error: --listen: value should be one of '
     '<loopback|all>'),
    ('', 'worker: error: --listen: value should be one of <loopback|all>'),
])
def test_launcher_listen_flag_is_checked(value, line):
  r = subprocess.run([sys.executable, '-m', 'perfed_tff.runtime.worker',
                      '--port=8000', f'--listen={value}'], env=h.env(),
                     capture_output=True, text=True, timeout=120,
                     stdin=subprocess.DEVNULL, cwd=h.ROOT)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [line], r.stderr


# ------------------------------------ refusals where it cannot be ensured

def _run_launcher(port, env, timeout=60):
  proc = _start_worker(port, env=env)
  try:
    _, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    _stop(proc)
    pytest.fail('the worker started instead of being refused')
  return proc.returncode, err


def _no_compiler_env(tmp_path):
  return h.env({'XDG_CACHE_HOME': str(tmp_path / 'cache'), 'CC': '/bin/false',
                loopback.LISTEN_ENV: ''})


def test_launcher_refuses_without_the_shim(tmp_path):
  status, err = _run_launcher(portpicker.pick_unused_port(),
                              _no_compiler_env(tmp_path))
  assert status == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith('worker: error: --listen=loopback: cannot keep '
                             'the worker on loopback: /bin/false failed to '
                             'build'), lines
  assert lines[0].endswith('Install a C compiler (e.g. `apt-get install '
                           'gcc`), or pass --listen=all to accept that '
                           'exposure.'), lines


@pytest.mark.slow
def test_train_refuses_without_the_shim(tmp_path):
  r = h.run(f'--root_output_dir={tmp_path}', '--rounds=1',
            extra_env=_no_compiler_env(tmp_path))
  assert r.returncode == 2, r.stderr[-3000:]
  line = h.assert_one_error_line(r.stderr)
  assert line.startswith('train.py: error: cannot keep the local TFF worker '
                         'on loopback: /bin/false failed to build'), line
  assert line.endswith(f'or set {loopback.LISTEN_ENV}=all to accept that '
                       'exposure.'), line


@pytest.fixture
def ignored_shim(tmp_path):
  """A cache whose shim loads but intercepts nothing (as if LD_PRELOAD
  were ignored): the worker listens on every interface."""
  if _CC is None:
    pytest.skip('no C compiler')
  source = tmp_path / 'noop.c'
  source.write_text('int perfed_tff_test_noop;\n')
  cache = tmp_path / 'cache' / 'perfed_tff'
  cache.mkdir(parents=True, mode=0o700)
  subprocess.run(_CC + ['-shared', '-fPIC', '-o',
                        str(cache / loopback.shim_file_name()), str(source)],
                 check=True, timeout=120)
  return h.env({'XDG_CACHE_HOME': str(tmp_path / 'cache'),
                loopback.LISTEN_ENV: ''})


def test_launcher_kills_a_worker_that_listens_beyond_loopback(ignored_shim):
  port = portpicker.pick_unused_port()
  status, err = _run_launcher(port, ignored_shim)
  assert status == -9, err
  lines = [l for l in err.splitlines() if 'error' in l]
  assert len(lines) == 1, err
  assert re.match(r'worker: error: the TFF worker \(pid \d+\) listens beyond '
                  rf'loopback on (\[::\]|0\.0\.0\.0):{port} although it was '
                  'started loopback-only', lines[0]), lines


@pytest.mark.slow
def test_train_stops_a_worker_that_listens_beyond_loopback(ignored_shim,
                                                           tmp_path):
  r = h.run(f'--root_output_dir={tmp_path / "run"}', '--rounds=1',
            extra_env=ignored_shim)
  assert r.returncode == 2, r.stderr[-3000:]
  line = h.assert_one_error_line(r.stderr)
  assert re.match(r'train.py: error: the local TFF worker \(pid \d+\) listens '
                  r'beyond loopback on (\[::\]|0\.0\.0\.0):\d+ although it was '
                  'started loopback-only', line), line
  assert line.endswith(f'set {loopback.LISTEN_ENV}=all to accept that '
                       'exposure.'), line
