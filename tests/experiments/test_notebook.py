"""Executes experiments/per_fedavg_colab.ipynb headless with a tiny config, on
both of its paths: in a kernel that can import TFF, and in a kernel whose
interpreter cannot (the separate-environment path). Every image the notebook
shows must be there and drawn (not one flat colour); in the kernel path that
includes the per-client histogram drawn with the kernel's own (inline)
matplotlib backend. No network is used: the separate environment is README's
own `./run.sh setup plots`, which reuses the checkout's .venv when it is
current."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import binary_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'per_fedavg_colab.ipynb')


def test_notebook_is_valid_and_colab_ready():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert 'requirements/runtime.txt' in sources.replace("', '", '/')
  assert "'--no-deps', '-r'" in sources     # a complete closure, as run.sh
  assert 'lock.txt' not in sources          # never the dev environment
  assert 'peer.txt' not in sources and 'torch' not in sources
  # The separate environment: the runtime and matplotlib, not the test layer.
  assert "['./run.sh', 'setup', 'plots']" in sources
  assert "'setup', 'test'" not in sources
  assert "'google.colab' in sys.modules" in sources
  assert 'ExecutionContext()' in sources and 'context.close()' in sources
  assert './run.sh' in sources and 'uv' in sources
  assert 'OWN_DATA_DIR' in sources and '--cache_dir' in sources
  assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
  runtime = open(os.path.join(ROOT, 'requirements', 'runtime.txt')).read()
  for kernel_package in ('ipykernel', 'ipython', 'tornado', 'traitlets',
                         'jupyter_client', 'pyzmq', 'pytest', 'matplotlib',
                         'torch'):
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
  monkeypatch.setenv('PERFED_TFF_COMPUTATION_CACHE',
                     binary_helpers.COMPUTATION_CACHE)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=900, kernel_name=kernel_name,
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()
  return nb


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]


def _images(cell):
  return [base64.b64decode(o['data']['image/png']) for o in cell.outputs
          if 'image/png' in o.get('data', {})]


def _assert_drawn(png, what):
  """The PNG decodes and has more than one colour: something is drawn."""
  image = pytest.importorskip('PIL.Image')
  assert png, f'{what}: empty image'
  pixels = np.asarray(image.open(io.BytesIO(png)).convert('RGB'))
  assert pixels.size, f'{what}: no pixels'
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, (
      f'{what}: one colour only (a blank figure)')


def _check_results(nb, out_dir, histogram):
  for name in ('notebook_digits.md', 'notebook_digits_curves.png',
               'notebook_digits_bars.png'):
    assert os.path.getsize(out_dir / name) > 0
  outputs = _outputs(nb)
  tables = [o for o in outputs if 'text/markdown' in o.get('data', {})]
  assert tables and 'Per-FedAvg (HF)' in tables[0]['data']['text/markdown']
  code = [c for c in nb.cells if c.cell_type == 'code']
  images = {i: _images(c) for i, c in enumerate(code) if _images(c)}
  for i, pngs in images.items():
    for j, png in enumerate(pngs):
      _assert_drawn(png, f'code cell {i}, image {j}')
  # The results cell shows the curves and the bars.
  shown = [i for i, c in enumerate(code) if 'notebook_digits.md' in c.source]
  assert len(shown) == 1 and len(images.get(shown[0], [])) == 2
  # The per-client histogram: drawn in the kernel (its inline backend) in the
  # kernel path; the separate path has none.
  hist = [i for i, c in enumerate(code) if 'ax.hist(' in c.source]
  assert len(hist) == 1
  assert len(images.get(hist[0], [])) == (1 if histogram else 0)
  assert sum(map(len, images.values())) == (3 if histogram else 2)
  return '\n'.join(o.get('text', '') for o in outputs
                   if o.get('output_type') == 'stream')


@pytest.mark.slow
def test_runs_in_a_kernel_that_has_tff(tmp_path, monkeypatch):
  before = _site_packages_listing()
  nb = _execute(tmp_path, monkeypatch)
  text = _check_results(nb, tmp_path / 'out', histogram=True)
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
  text = _check_results(nb, tmp_path / 'out', histogram=False)
  assert 'path: separate' in text
  assert 'experiments run with' in text and '.venv/bin/python' in text
  assert 'per_fedavg_hf seed=0: done' in text    # the subprocess's live output
  assert _site_packages_listing() == before
