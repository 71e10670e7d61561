"""`python -m perfed_tff.runtime.worker`: command line and a served worker."""

import subprocess
import sys

import portpicker
import pytest

from perfed_tff.runtime import execution
from perfed_tff.runtime import worker
from tests import binary_helpers as h


def test_worker_command_uses_the_wheels_binary():
  cmd = worker.worker_command(8000, 4)
  assert cmd == [worker.worker_binary_path(), '--port=8000',
                 '--max_concurrent_computation_calls=4']
  with pytest.raises(ValueError, match='--port: must be an integer in'):
    worker.worker_command(0)


def test_served_worker_accepts_a_context():
  port = portpicker.pick_unused_port()
  proc = subprocess.Popen([sys.executable, '-m', 'perfed_tff.runtime.worker',
                           f'--port={port}'], env=h.env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  try:
    with execution.ExecutionContext(workers=[f'localhost:{port}'],
                                    ready_timeout=60):
      import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top

      @tff.tensorflow.computation(np.int32)
      def inc(x):
        return x + 1
      assert inc(41) == 42
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  # exec: the Python process became the worker_binary itself.
  assert proc.returncode in (-15, 0, 143)


def test_worker_refuses_a_busy_port():
  import socket  # pylint: disable=g-import-not-at-top
  sock = socket.socket()
  sock.bind(('', 0))
  sock.listen()
  try:
    assert worker.port_in_use(sock.getsockname()[1])
  finally:
    sock.close()


@pytest.mark.parametrize('flag,line', [
    ('--port=abc', "worker: error: --port: must be an integer in 1..65535, "
     "got 'abc'"),
    ('--port=0', 'worker: error: --port: must be an integer in 1..65535, '
     'got 0'),
    ('--prot=8000', "worker: error: Unknown command line flag 'prot'"),
])
def test_bad_flags_are_one_line_and_exit_2(flag, line):
  r = subprocess.run([sys.executable, '-m', 'perfed_tff.runtime.worker', flag],
                     env=h.env(), capture_output=True, text=True, timeout=120,
                     stdin=subprocess.DEVNULL, cwd=h.ROOT)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(line), r.stderr
  assert 'FATAL' not in r.stderr
