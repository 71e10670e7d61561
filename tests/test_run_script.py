"""run.sh's environment layers: `setup` and `demo` install the runtime only,
`setup plots` adds matplotlib, `test` adds the test tools and PyTorch; each
layer is installed once (its own stamp) and a second call installs nothing.

run.sh runs on a copy of itself and the requirement files, against a
stand-in `.venv/bin/python` that records its arguments, so nothing is
installed and no network is used."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Checkout:
  """run.sh, setup.py and requirements/ in `root`, and a recording .venv."""

  def __init__(self, root):
    self.root = root
    shutil.copy2(os.path.join(ROOT, 'run.sh'), root / 'run.sh')
    shutil.copy2(os.path.join(ROOT, 'setup.py'), root / 'setup.py')
    shutil.copytree(os.path.join(ROOT, 'requirements'), root / 'requirements')
    bin_dir = root / '.venv' / 'bin'
    bin_dir.mkdir(parents=True)
    self.log = root / 'calls.log'
    self.log.write_text('')
    python = bin_dir / 'python'
    python.write_text(f'#!/bin/sh\necho "$*" >> {self.log}\n')
    python.chmod(0o755)
    self._seen = 0

  def run(self, *args):
    """Runs `./run.sh args`; returns the stand-in python's new calls."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    proc = subprocess.run(['bash', str(self.root / 'run.sh'), *args],
                          capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    calls = self.log.read_text().splitlines()
    new, self._seen = calls[self._seen:], len(calls)
    return new


def _installs(calls):
  return [c for c in calls if c.startswith('-m pip install')]


RUNTIME = ['-m pip install -q --no-deps -r requirements/runtime.txt',
           '-m pip install -q --no-deps tensorflow-federated==0.87.0',
           '-m pip install -q --no-deps -e .']
PLOTS = ['-m pip install -q -r requirements/plots.txt']
TEST = ['-m pip install -q --no-deps -r requirements/lock.txt',
        '-m pip install -q -r requirements/peer.txt']


def test_setup_installs_the_runtime_only_and_once(tmp_path):
  checkout = _Checkout(tmp_path)
  assert checkout.run('setup') == RUNTIME
  assert checkout.run('setup') == []            # stamped: nothing again
  assert checkout.run('setup', 'plots') == PLOTS
  assert checkout.run('setup', 'plots') == []
  assert checkout.run('setup', 'test') == TEST
  assert checkout.run('setup', 'test') == []
  assert checkout.run('setup') == []
  assert sorted(p.name for p in (tmp_path / '.venv').glob('.perfed_tff_*')) == [
      '.perfed_tff_plots_stamp', '.perfed_tff_runtime_stamp',
      '.perfed_tff_test_stamp']


def test_demo_installs_the_runtime_and_test_everything(tmp_path):
  checkout = _Checkout(tmp_path)
  calls = checkout.run('demo', '--rounds=1')
  assert _installs(calls) == RUNTIME
  assert calls[-1].startswith('-m experiments.train ')
  assert calls[-1].endswith(' --rounds=1')
  calls = checkout.run('test', '-k', 'nothing')
  assert _installs(calls) == TEST                 # the runtime is current
  assert calls[-1] == '-m pytest -q tests -k nothing'
  calls = checkout.run('test')
  assert calls == ['-m pytest -q tests']          # second call: no installs


def test_a_changed_requirement_file_reinstalls_its_layers(tmp_path):
  checkout = _Checkout(tmp_path)
  checkout.run('setup', 'test')
  with open(tmp_path / 'requirements' / 'peer.txt', 'a') as f:
    f.write('# changed\n')
  assert checkout.run('test') == TEST + ['-m pytest -q tests']
  with open(tmp_path / 'requirements' / 'runtime.txt', 'a') as f:
    f.write('# changed\n')
  # The runtime first; then the test layer again over it.
  assert _installs(checkout.run('setup', 'test')) == RUNTIME + TEST
