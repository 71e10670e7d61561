"""A run's output folder (`perfed_tff/program/outputs.py`): its settings
files and the output-directory lock."""

import errno
import json
import os
import subprocess
import sys

import pytest

from perfed_tff import checks
from perfed_tff.program import outputs
from tests import tff_helpers as h


def test_settings_files_are_written_and_a_damaged_one_is_said(tmp_path):
  config = h.training_config(tmp_path)
  paths = outputs.output_paths(config)
  os.makedirs(paths['run_dir'])
  lines = []
  outputs.write_settings(config, paths, write=lines.append)
  assert not lines
  assert json.loads(open(paths['config']).read())['alpha'] == config.alpha
  rows = open(paths['hparams']).read().splitlines()
  assert len(rows) == 2 and rows[0].split(',')[0] == 'algorithm'
  with open(paths['config'], 'w') as f:
    f.write('{"truncated": ')
  with open(paths['hparams'], 'w') as f:
    f.write('a,b\n1\n')
  outputs.write_settings(config, paths, write=lines.append)
  assert len(lines) == 2, lines
  assert lines[0].startswith(f'warning: {paths["config"]} was unreadable (')
  assert lines[1].startswith(f'warning: {paths["hparams"]} was unreadable ('
                             'not a header and one row)')
  assert json.loads(open(paths['config']).read())['alpha'] == config.alpha


_HOLDER = '''
import sys, time
sys.path.insert(0, {root!r})
from perfed_tff.program import outputs
lock = outputs.OutputDirLock({path!r}).__enter__()
print('locked', flush=True)
time.sleep(600)
'''


def test_output_dir_lock_refuses_then_takes_over_a_killed_holder(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER.format(root=root, path=str(tmp_path))],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checks.ArgumentError) as e:
      outputs.OutputDirLock(str(tmp_path)).__enter__()
    assert e.value.name == 'root_output_dir'
    assert f'is in use by a running run (pid {holder.pid} on ' in str(e.value)
  finally:
    holder.kill()
    holder.wait()
  with outputs.OutputDirLock(str(tmp_path)) as lock:
    assert lock.previous_owner['pid'] == holder.pid  # Stale: taken over.
    with outputs.OutputDirLock(str(tmp_path)):  # Re-entrant.
      pass
    owner = json.loads((tmp_path / outputs.LOCK_NAME).read_text())
    assert owner['pid'] == os.getpid()
  assert not (tmp_path / outputs.LOCK_NAME).exists()


def test_a_full_disk_when_taking_the_lock_names_it_and_leaves_nothing(
    tmp_path, monkeypatch):
  # Found by experiments/chaos_soak.py: a run started on a full disk said
  # `the disk is full;` with no path and left an empty lock file behind.
  def full(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(outputs.os, 'pwrite', full)
  with pytest.raises(OSError) as e:
    outputs.OutputDirLock(str(tmp_path)).__enter__()
  assert e.value.errno == errno.ENOSPC
  assert e.value.filename == str(tmp_path / outputs.LOCK_NAME)
  assert not (tmp_path / outputs.LOCK_NAME).exists()
  monkeypatch.undo()
  with outputs.OutputDirLock(str(tmp_path)):  # Nothing held: it works.
    pass
