"""Executes experiments/per_fedavg_colab.ipynb headless with a tiny config, on
both of its paths: in a kernel that can import TFF, and in a kernel whose
interpreter cannot (the separate-environment path). No network is used: the
separate environment is README's own `./run.sh setup`, which reuses the
checkout's .venv when it is current."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'per_fedavg_colab.ipynb')


def test_notebook_is_valid_and_colab_ready():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert 'requirements/runtime.txt' in sources.replace("', '", '/')
  assert 'lock.txt' not in sources          # never the dev environment
  assert "'google.colab' in sys.modules" in sources
  assert 'ExecutionContext()' in sources and 'context.close()' in sources
  assert './run.sh' in sources and 'uv' in sources
  assert 'OWN_DATA_DIR' in sources and '--cache_dir' in sources
  assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
  runtime = open(os.path.join(ROOT, 'requirements', 'runtime.txt')).read()
  for kernel_package in ('ipykernel', 'ipython', 'tornado', 'traitlets',
                         'jupyter_client', 'pyzmq', 'pytest'):
    assert f'\n{kernel_package}==' not in runtime.lower()
  assert 'tensorflow==2.14.1' in runtime


def _site_packages_listing():
  out = subprocess.run([sys.executable, '-m', 'pip', 'list', '--format=json'],
                       capture_output=True, text=True, check=True).stdout
  return sorted((p['name'], p['version']) for p in json.loads(out))


def _execute(tmp_path, monkeypatch, kernel_name='python3'):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('PERFED_NB_SMALL', '1')
  monkeypatch.setenv('PERFED_NB_OUTPUT', str(tmp_path / 'out'))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=900, kernel_name=kernel_name,
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()
  return nb


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]


def _check_results(nb, out_dir):
  for name in ('notebook_digits.md', 'notebook_digits_curves.png',
               'notebook_digits_bars.png'):
    assert os.path.getsize(out_dir / name) > 0
  outputs = _outputs(nb)
  tables = [o for o in outputs if 'text/markdown' in o.get('data', {})]
  assert tables and 'Per-FedAvg (HF)' in tables[0]['data']['text/markdown']
  assert any('image/png' in o.get('data', {}) for o in outputs)
  return '\n'.join(o.get('text', '') for o in outputs
                   if o.get('output_type') == 'stream')


@pytest.mark.slow
def test_runs_in_a_kernel_that_has_tff(tmp_path, monkeypatch):
  before = _site_packages_listing()
  nb = _execute(tmp_path, monkeypatch)
  text = _check_results(nb, tmp_path / 'out')
  assert 'path: kernel' in text
  assert _site_packages_listing() == before      # nothing installed


@pytest.mark.slow
def test_runs_beside_a_kernel_that_cannot_import_tff(tmp_path, monkeypatch):
  """The kernel's interpreter cannot import tensorflow_federated (a module of
  that name that fails, first on its path): the notebook must take the
  separate-environment path and show what the subprocess produced."""
  blocker = tmp_path / 'blocker' / 'tensorflow_federated'
  blocker.mkdir(parents=True)
  (blocker / '__init__.py').write_text(
      "raise ImportError('tensorflow_federated cannot be installed on this "
      "kernel')\n")
  kernels = tmp_path / 'jupyter' / 'kernels' / 'no-tff'
  kernels.mkdir(parents=True)
  (kernels / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'Python without TFF', 'language': 'python',
      'env': {'PYTHONPATH': str(tmp_path / 'blocker')}}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('PERFED_REPO_ROOT', ROOT)
  before = _site_packages_listing()
  nb = _execute(tmp_path, monkeypatch, kernel_name='no-tff')
  text = _check_results(nb, tmp_path / 'out')
  assert 'path: separate' in text
  assert 'experiments run with' in text and '.venv/bin/python' in text
  assert 'per_fedavg_hf seed=0: done' in text    # the subprocess's live output
  assert _site_packages_listing() == before
