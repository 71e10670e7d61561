"""Every ```python block of README.md runs, exactly as written, in a fresh
interpreter (its own temporary working directory, the repository on
PYTHONPATH), so a README example cannot rot.

Each block must import and build what it uses and finish at a tiny budget
(a few rounds on offline data). A block that runs in TFF's own context
leaves TFF's `worker_binary` running after it exits, holding its output
pipes open (TFF's behaviour, README says so); the test stops that worker at
the block's exit, as the test fixtures do (`tests/contexts.py`). A block that cannot run here is marked in
README.md by the line `<!-- readme-test: skip (reason) -->` right before it
and is skipped with that reason.
"""

import os
import re
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest

from tests import binary_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a block as a script, and at its exit stops the workers of TFF's own
# context that it started.
_RUN_BLOCK = """
import atexit, runpy, sys
def _stop_tff_workers():
  from tests import contexts
  contexts.stop_tff_service_managers()
  contexts.stop_worker_children()
atexit.register(_stop_tff_workers)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
README = os.path.join(ROOT, 'README.md')
# Seconds one block may take (they take 10-20 s on 2 shared cores).
BLOCK_TIMEOUT = 300
_FENCE = re.compile(r'^\s*```')
_SKIP = re.compile(r'^\s*<!--\s*readme-test:\s*skip\s*\((.*)\)\s*-->\s*$')


class Block(NamedTuple):
  """One ```python block: its test id, code, the line of its opening fence
  and its skip reason (None: it runs)."""
  id: str
  code: str
  line: int
  skip: Optional[str]


def readme_blocks(text: str) -> list[Block]:
  """The ```python blocks of a Markdown `text`, in order, each named after
  the heading above it (numbered when a heading has several)."""
  found = []  # (heading, code, line, skip)
  heading = 'top'
  previous = ''  # The last non-blank line outside a fence.
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if _FENCE.match(line):
      language = line.strip()[3:].strip().lower()
      start = i + 1
      i += 1
      while i < len(lines) and not _FENCE.match(lines[i]):
        i += 1
      if language == 'python':
        skip = _SKIP.match(previous)
        found.append((heading, '\n'.join(lines[start:i]) + '\n', start,
                      skip[1].strip() if skip else None))
      previous = ''
    elif line.startswith('#'):
      heading = line.lstrip('#').strip()
      previous = line
    elif line.strip():
      previous = line
    i += 1
  counts = {}
  for heading, *_ in found:
    counts[heading] = counts.get(heading, 0) + 1
  blocks, seen = [], {}
  for heading, code, line, skip in found:
    slug = re.sub(r'\W+', '_', heading.lower()).strip('_') or 'block'
    if counts[heading] > 1:
      seen[heading] = seen.get(heading, 0) + 1
      slug = f'{slug}_{seen[heading]}'
    blocks.append(Block(slug, code, line, skip))
  return blocks


def _readme_blocks() -> list[Block]:
  with open(README, encoding='utf-8') as f:
    return readme_blocks(f.read())


def test_readme_has_python_blocks():
  assert _readme_blocks(), f'{README} has no ```python block'


def test_blocks_are_found_under_their_headings():
  text = ('# T\n\n```python\na = 1\n```\n\n## Two words\n\n```bash\n'
          '# not a heading\n```\n\n<!-- readme-test: skip (needs a remote '
          'worker) -->\n```python\nb = 2\n```\n\n```python\nc = 3\n```\n')
  assert readme_blocks(text) == [
      Block('t', 'a = 1\n', 3, None),
      Block('two_words_1', 'b = 2\n', 14, 'needs a remote worker'),
      Block('two_words_2', 'c = 3\n', 18, None)]


@pytest.mark.slow
@pytest.mark.parametrize('block', _readme_blocks(), ids=lambda b: b.id)
def test_readme_block_runs(block, tmp_path):
  if block.skip:
    pytest.skip(block.skip)
  script = tmp_path / 'readme_block.py'
  script.write_text(block.code)
  work_dir = tmp_path / 'cwd'
  work_dir.mkdir()
  env = binary_helpers.env()
  try:
    done = subprocess.run([sys.executable, '-c', _RUN_BLOCK, str(script)],
                          cwd=work_dir,
                          env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=BLOCK_TIMEOUT)
  except subprocess.TimeoutExpired:
    pytest.fail(f'README.md line {block.line} ({block.id}) ran longer than '
                f'{BLOCK_TIMEOUT} s; make the block smaller')
  output = (done.stdout + done.stderr)[-4000:]
  assert done.returncode == 0, (
      f'README.md line {block.line} ({block.id}) failed with exit status '
      f'{done.returncode}:\n{output}')
