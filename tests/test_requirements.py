"""The requirement files agree with each other and with the packages'
declared dependencies (read from this environment's installed metadata,
which `./run.sh test` builds from requirements/lock.txt):

* runtime.txt (`./run.sh setup`, installed with --no-deps) is exactly the
  closure of TFF, perfed_tff's install_requires, tqdm and psutil, less the
  two TensorFlow dependencies it never imports: nothing missing, nothing
  extra (no plotting, test or notebook packages);
* plots.txt is matplotlib's closure beyond the runtime;
* lock.txt (installed with --no-deps) is complete, and every file pins a
  package at the version lock.txt pins it at;
* without torch (not in the runtime), the benchmark says how to get it."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Declared by tensorflow 2.14 but never imported at run time: libclang (a
# build tool's dependency), the GCS filesystem plugin (imported only when
# TF_USE_MODULAR_FILESYSTEM is set). See BUILD_NOTES.md.
NOT_IN_RUNTIME = {'libclang', 'tensorflow-io-gcs-filesystem'}
# Installed by pip/venv, or with --no-deps from run.sh, not from the files.
BUILD_TOOLS = {'pip', 'setuptools', 'wheel'}
TFF = 'tensorflow-federated'


def _norm(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def _pins(name):
  pins = {}
  with open(os.path.join(ROOT, 'requirements', name)) as f:
    for line in f:
      line = line.split('#')[0].strip()
      if line:
        package, version = line.split('==')
        pins[_norm(package)] = version
  return pins


_DISTS = {_norm(d.metadata['Name']): d
          for d in importlib.metadata.distributions()}


def _requires(name):
  """Names of a package's unconditional dependencies (no extras)."""
  dist = _DISTS.get(name)
  if dist is None:
    pytest.fail(f'{name} is not installed: run ./run.sh setup test')
  out = set()
  for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({'extra': ''}):
      out.add(_norm(req.name))
  return out


def _closure(roots, stop=()):
  seen, todo = set(), [_norm(r) for r in roots]
  while todo:
    name = todo.pop()
    if name in seen or name in stop:
      continue
    seen.add(name)
    todo.extend(_requires(name))
  return seen


def test_runtime_is_exactly_the_runtime_closure():
  roots = {TFF, 'tqdm', 'psutil'} | _requires('perfed-tff')
  want = _closure(roots, stop=NOT_IN_RUNTIME) - BUILD_TOOLS - {TFF}
  runtime = set(_pins('runtime.txt'))
  assert sorted(want - runtime) == []           # nothing missing (--no-deps)
  assert sorted(runtime - want) == []           # nothing unneeded
  for heavy in ('matplotlib', 'torch', 'pytest', 'ipykernel', 'nbclient',
                *NOT_IN_RUNTIME):
    assert heavy not in runtime


def test_plots_is_matplotlib_beyond_the_runtime():
  runtime = set(_pins('runtime.txt'))
  assert set(_pins('plots.txt')) == _closure(['matplotlib']) - runtime


def test_lock_is_complete_and_every_pin_agrees_with_it():
  lock = _pins('lock.txt')
  missing = _closure(lock) - set(lock) - BUILD_TOOLS
  assert sorted(missing) == []                  # installed with --no-deps
  assert 'torch' not in lock and TFF not in lock
  for name in ('runtime.txt', 'plots.txt', 'peer.txt'):
    pins = _pins(name)
    both = set(pins) & set(lock)
    if name != 'peer.txt':
      assert both == set(pins), f'{name}: not in lock.txt: {set(pins) - both}'
    assert {p: pins[p] for p in both} == {p: lock[p] for p in both}, name


def test_the_benchmark_says_how_to_get_torch_when_it_is_missing():
  """`./run.sh setup` leaves torch out; the benchmark's one line about the
  skipped PyTorch contenders says how to install it."""
  code = ('import sys\n'
          "sys.modules['torch'] = None\n"   # `import torch` fails
          'from experiments import torch_peer\n'
          'print(torch_peer.unavailable_reason())\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        stdin=subprocess.DEVNULL)
  assert proc.returncode == 0, proc.stderr
  line, = proc.stdout.splitlines()
  assert 'pip install -r requirements/peer.txt' in line
  assert './run.sh test' in line
