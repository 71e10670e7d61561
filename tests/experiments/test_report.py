"""experiments/report.py's plots: they never switch the process's matplotlib
backend (a notebook kernel keeps its inline backend), they are not blank,
and without matplotlib the tables are still written and the plots are
skipped with one line, in the library and in the `compare` binary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import report
from tests import binary_helpers as h


def _fake_results(algs=('fedavg', 'per_fedavg_hf'), seeds=(0, 1)):
  rng = np.random.default_rng(0)

  def summary(base):
    out = {'num_clients': 5}
    for k in (0, 1, 5):
      out[f'step_{k}'] = {
          m: float(np.clip(base + 0.05 * k + rng.normal(0, 0.01), 0, 1))
          for m in report.SUMMARY_METRICS}
    return out

  runs = []
  for seed in seeds:
    for i, a in enumerate(algs):
      curve = [(r, {'seen': summary(0.5 + 0.01 * r + 0.05 * i),
                    'unseen': summary(0.4 + 0.01 * r + 0.05 * i)})
               for r in (0, 5, 10)]
      runs.append(dict(algorithm=a, seed=seed, curve=curve,
                       final=curve[-1][1], train_seconds=1.0))
  return {'config': {'seeds': list(seeds), 'eval_steps': [1, 5],
                     'alpha': 0.05}, 'task': 'fake', 'runs': runs}


def _fake_sweep():
  return {'sweep': 'dataset_options',
          'levels': ['classes_per_user=1', 'classes_per_user=5'],
          'results': [_fake_results() for _ in range(2)]}


def assert_png_not_blank(png: bytes, what: str = 'image'):
  """A PNG that decodes and has more than one colour (a figure with nothing
  drawn on it is one flat colour)."""
  image = pytest.importorskip('PIL.Image')
  import io  # pylint: disable=g-import-not-at-top
  assert png, f'{what}: empty'
  pixels = np.asarray(image.open(io.BytesIO(png)).convert('RGB'))
  assert pixels.size, f'{what}: no pixels'
  colours = np.unique(pixels.reshape(-1, 3), axis=0)
  assert len(colours) > 1, f'{what}: one colour only, blank'


def test_plots_leave_the_matplotlib_backend_unchanged(tmp_path):
  matplotlib = pytest.importorskip('matplotlib')
  before = matplotlib.get_backend()
  # Stands in for a notebook kernel's inline backend: any backend other than
  # Agg, which the plots must not switch to.
  kernel_backend = 'svg' if before.lower() != 'svg' else 'pdf'
  matplotlib.use(kernel_backend)
  try:
    paths = report.write_results(_fake_results(), str(tmp_path), 'cmp')
    assert matplotlib.get_backend() == kernel_backend
    sweep = report.write_results(_fake_sweep(), str(tmp_path), 'sweep')
    assert matplotlib.get_backend() == kernel_backend
  finally:
    matplotlib.use(before)
  for path in (paths['curves'], paths['bars'], sweep['plot']):
    with open(path, 'rb') as f:
      assert_png_not_blank(f.read(), path)


_WITHOUT_MATPLOTLIB = (
    'import sys\n'
    # `import matplotlib` raises ImportError, as on a machine without it.
    "sys.modules['matplotlib'] = None\n")


def _python(code, timeout=300):
  return subprocess.run([sys.executable, '-c', _WITHOUT_MATPLOTLIB + code],
                        env=h.env(), cwd=h.ROOT, capture_output=True,
                        text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_without_matplotlib_tables_are_written_and_plots_skipped(tmp_path):
  (tmp_path / 'cmp.json').write_text(json.dumps(_fake_results()))
  (tmp_path / 'sweep.json').write_text(json.dumps(_fake_sweep()))
  out = tmp_path / 'out'
  r = _python(
      'import json\n'
      'from experiments import report\n'
      'paths = {}\n'
      f'for name in ("cmp", "sweep"):\n'
      f'  results = json.load(open({str(tmp_path)!r} + f"/{{name}}.json"))\n'
      f'  for _ in range(2):  # compare writes twice: run dir, output dir\n'
      f'    paths[name] = report.write_results(results, {str(out)!r}, name)\n'
      'assert report.plot_curves(results["results"][0], "x.png") is None\n'
      'print(json.dumps(paths))\n')
  assert r.returncode == 0, r.stderr[-3000:]
  paths = json.loads(r.stdout)
  assert sorted(paths['cmp']) == ['csv', 'json', 'md']
  assert sorted(paths['sweep']) == ['csv', 'json', 'md']
  for p in list(paths['cmp'].values()) + list(paths['sweep'].values()):
    assert os.path.getsize(p) > 0
  assert not list(out.glob('*.png')) and not os.path.exists(
      os.path.join(h.ROOT, 'x.png'))
  assert r.stderr.count(report.PLOTS_SKIPPED) == 1
  assert [l for l in r.stderr.splitlines() if 'matplotlib' in l] == [
      report.PLOTS_SKIPPED]


def test_compare_binary_without_matplotlib_writes_its_tables(tmp_path):
  """`python -m experiments.compare --replot` (tables and plots of saved
  results, no training) on a machine without matplotlib."""
  (tmp_path / 'cmp.json').write_text(json.dumps(_fake_results()))
  argv = ['compare', f'--replot={tmp_path}/cmp.json',
          f'--output_dir={tmp_path}/out', '--table_rounds=5']
  r = _python(f'sys.argv = {argv!r}\n'
              'from absl import app\n'
              'from experiments import compare\n'
              'app.run(compare.main)\n')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '| Per-FedAvg (HF) |' in r.stdout          # the table, printed
  for suffix in ('.md', '.csv', '.json'):
    assert os.path.getsize(tmp_path / 'out' / ('cmp' + suffix)) > 0
  assert not list((tmp_path / 'out').glob('*.png'))
  assert [l for l in r.stderr.splitlines() if 'matplotlib' in l] == [
      report.PLOTS_SKIPPED]


def test_reproduce_paper_outputs_without_matplotlib(tmp_path):
  """`reproduce_paper`'s outputs (the committed real-MNIST results) without
  matplotlib: its tables, no curves, one line; no TypeError at the end."""
  results = os.path.join(h.ROOT, 'docs', 'results', 'paper_mnist',
                         'results.json')
  r = _python(
      'import json\n'
      'from experiments import reproduce_paper_lib\n'
      f'results = json.load(open({results!r}))\n'
      'paths = reproduce_paper_lib.write_outputs(results, '
      f'{str(tmp_path / "out")!r})\n'
      'print(json.dumps(sorted(paths.values())))\n')
  assert r.returncode == 0, r.stderr[-3000:]
  paths = json.loads(r.stdout)
  assert sorted(os.path.basename(p) for p in paths) == [
      'results.json', 'table.csv', 'table.md']
  assert not list((tmp_path / 'out').glob('*.png'))
  assert [l for l in r.stderr.splitlines() if 'matplotlib' in l] == [
      report.PLOTS_SKIPPED]
