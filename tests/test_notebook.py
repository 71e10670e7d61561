"""Executes experiments/per_fedavg_colab.ipynb headless with a tiny config."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'experiments', 'per_fedavg_colab.ipynb')


def test_notebook_is_valid_and_colab_ready():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert "'google.colab' in sys.modules" in sources  # install only in Colab
  assert 'requirements/lock.txt' in sources
  assert 'ExecutionContext()' in sources and 'context.close()' in sources
  assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('PERFED_NB_SMALL', '1')
  monkeypatch.setenv('PERFED_NB_OUTPUT', str(tmp_path))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=400, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()
  for name in ('notebook_digits.md', 'notebook_digits_curves.png',
               'notebook_digits_bars.png'):
    assert os.path.getsize(tmp_path / name) > 0
  table = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
           if 'text/markdown' in o.get('data', {})]
  assert table and 'Per-FedAvg (HF)' in table[0]['data']['text/markdown']
