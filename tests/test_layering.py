"""The package's three rings, read from the code's own imports (`ast`):

* core (`perfed_tff/*.py`, `data/`, `models/`) and program (`program/`)
  import TFF only as `import tensorflow_federated as tff` and read no
  private attribute of it (nor another object's, by `getattr` or a closure);
* core imports neither the program nor the outer ring;
* the program reaches the outer ring (`runtime/`, `accelerator/`) only
  through `program/launch.py`;
* no module of the package takes part in an import circle;
* the outer ring refuses any TFF version but the one it was written for,
  in one line that says how to run without it, and the library and the
  program then run without it.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'perfed_tff')
RING_PACKAGES = ('perfed_tff.runtime', 'perfed_tff.accelerator')


def _modules():
  """{dotted module name: path} of every module of the package."""
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if rel[-1] == '__init__':
          rel = rel[:-1]
        out['.'.join(rel)] = path
  return out


MODULES = _modules()


def ring_of(module: str) -> str:
  if module.startswith(RING_PACKAGES):
    return 'outer'
  if module.startswith('perfed_tff.program'):
    return 'program'
  return 'core'


def _tree(module):
  with open(MODULES[module]) as f:
    return ast.parse(f.read(), MODULES[module])


def _imports(module, *, top_level_only=False):
  """[(imported module, line)] of `module`, function-level imports too
  unless `top_level_only`."""
  tree = _tree(module)
  nodes = tree.body if top_level_only else ast.walk(tree)
  out = []
  for node in nodes:
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # Relative: resolved against the package.
        parts = module.split('.')[:-node.level + (module in _packages())]
        base = '.'.join(parts + [node.module])
      out.append((base, node.lineno))
      for a in node.names:  # `from perfed_tff.program import launch`.
        if f'{base}.{a.name}' in MODULES:
          out.append((f'{base}.{a.name}', node.lineno))
  return out


def _packages():
  return {m for m, p in MODULES.items() if p.endswith('__init__.py')}


INNER = sorted(m for m in MODULES if ring_of(m) != 'outer')


@pytest.mark.parametrize('module', INNER)
def test_core_and_program_use_tffs_public_api_only(module):
  tree = _tree(module)
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('tensorflow_federated') and (
            a.name != 'tensorflow_federated' or a.asname != 'tff'):
          bad.append(f'line {node.lineno}: import {a.name}')
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('tensorflow_federated')):
      bad.append(f'line {node.lineno}: from {node.module} import ...')
    elif isinstance(node, ast.Attribute):
      chain, value = [node.attr], node.value
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id == 'tff' and any(
          part.startswith('_') for part in chain):
        bad.append(f'line {node.lineno}: tff.{".".join(reversed(chain))}')
      if node.attr in ('__closure__', 'cell_contents'):
        bad.append(f'line {node.lineno}: .{node.attr}')
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ('getattr', 'hasattr') and len(node.args) >= 2
          and isinstance(node.args[1], ast.Constant)
          and isinstance(node.args[1].value, str)
          and node.args[1].value.startswith('_')
          and not node.args[1].value.startswith('__')):
      bad.append(f'line {node.lineno}: {node.func.id}(..., '
                 f'{node.args[1].value!r})')
  assert not bad, f'{module} reaches into TFF (or private state): {bad}'


# The standard library's documented underscore names.
_STDLIB_PRIVATE = {'os': {'_exit'}, 'sys': {'_getframe'}}


@pytest.mark.parametrize('module', INNER)
def test_private_attributes_are_read_only_on_the_modules_own_objects(module):
  """`x._name` only for `self`/`cls`, or a name the module itself assigns
  (`self._name = ...`, a class attribute): never another package's."""
  tree = _tree(module)
  own = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
      own.add(node.attr)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      own.add(node.name)
    elif isinstance(node, ast.Assign):
      own.update(t.id for t in node.targets if isinstance(t, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target,
                                                        ast.Name):
      own.add(node.target.id)
  bad = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
        and not node.attr.startswith('__') and node.attr not in own
        and not (isinstance(node.value, ast.Name)
                 and node.value.id in _STDLIB_PRIVATE
                 and node.attr in _STDLIB_PRIVATE[node.value.id])):
      bad.append(f'line {node.lineno}: .{node.attr}')
  assert not bad, f'{module} reads private attributes: {bad}'


@pytest.mark.parametrize('module', INNER)
def test_core_imports_neither_the_program_nor_the_outer_ring(module):
  if ring_of(module) != 'core':
    pytest.skip('a program module')
  bad = [(m, line) for m, line in _imports(module)
         if m.startswith(('perfed_tff.program',) + RING_PACKAGES)]
  assert not bad, f'{module} imports {bad}'


@pytest.mark.parametrize('module', INNER)
def test_the_program_reaches_the_outer_ring_through_launch_only(module):
  if ring_of(module) != 'program' or module == 'perfed_tff.program.launch':
    pytest.skip('not a program module, or the launch module')
  bad = [(m, line) for m, line in _imports(module)
         if m.startswith(RING_PACKAGES)]
  assert not bad, f'{module} imports the outer ring: {bad}'


def test_the_launch_module_imports_the_ring_only_where_it_is_used():
  """At module level it imports nothing of the ring (a run with runtime
  'tff' works on any TFF version)."""
  bad = [(m, line) for m, line in _imports('perfed_tff.program.launch',
                                           top_level_only=True)
         if m.startswith(RING_PACKAGES)]
  assert not bad


def test_the_packages_lazy_names_are_core():
  tree = _tree('perfed_tff')
  strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and n.value.startswith('perfed_tff.')]
  assert strings and all(ring_of(s) == 'core' for s in strings), strings


def test_no_import_circles():
  graph = {m: {i for i, _ in _imports(m, top_level_only=True) if i in MODULES
               and i != m and not m.startswith(i + '.')}
           for m in MODULES}
  # Tarjan's strongly connected components.
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  sys.setrecursionlimit(10000)
  for v in graph:
    if v not in index:
      visit(v)
  assert not circles, circles


def test_every_module_fits_in_a_readers_head():
  long = {m: n for m, p in MODULES.items()
          if (n := sum(1 for _ in open(p))) > 450}
  assert not long, long


_OTHER_TFF = '''
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = (
    lambda name: '0.88.0' if name == 'tensorflow-federated' else real(name))
sys.path.insert(0, {root!r})
import tempfile
from perfed_tff import checks
from perfed_tff.program import settings
root = tempfile.mkdtemp()
settings.validate(settings.TrainingConfig(root_output_dir=root))
print('tff runtime: ok')
try:
  settings.validate(settings.TrainingConfig(runtime='owned',
                                            root_output_dir=root))
except checks.ArgumentError as e:
  print('owned:', e.flag_message)
try:
  import perfed_tff.accelerator
except ImportError as e:
  print('import:', type(e).__name__, str(e))
'''


def test_the_outer_ring_refuses_another_tff_in_one_line():
  done = subprocess.run(
      [sys.executable, '-c', _OTHER_TFF.format(root=ROOT)],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert lines[0] == 'tff runtime: ok'
  assert lines[1].startswith(
      "owned: --runtime: 'owned': perfed_tff.runtime and "
      'perfed_tff.accelerator are written for tensorflow-federated 0.87.0, '
      'found 0.88.0; run without them:'), lines[1]
  assert '--runtime=tff' in lines[1]
  assert lines[2].startswith('import: UnsupportedTFFVersionError '
                             'perfed_tff.runtime and perfed_tff.accelerator')
  assert len(lines) == 3
