"""Offline behaviour and the dataset switch: a missing TFF file gives one line
naming the file and the directory; unknown names/options are ValueErrors."""

import os
import time
import urllib.error
import urllib.request

import pytest

from perfed_tff.data import offline
from perfed_tff.data import registry


@pytest.mark.parametrize('name,filename,display', [
    ('emnist', 'emnist_all.sqlite', 'EMNIST'),
    ('emnist62', 'emnist_all.sqlite', 'EMNIST-62'),
    ('shakespeare', 'shakespeare.sqlite', 'Shakespeare'),
])
def test_missing_file_download_disabled_is_one_line(tmp_path, name, filename,
                                                    display):
  cache = tmp_path / 'cache'
  with pytest.raises(registry.DatasetUnavailableError) as info:
    registry.load_task(name, cache_dir=str(cache), download=False)
  assert str(info.value) == (
      f'{display} is not available offline: place {filename} in {cache} '
      '(download disabled)')
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize('name,filename,display', [
    ('emnist', 'emnist_all.sqlite', 'EMNIST'),
    ('shakespeare', 'shakespeare.sqlite', 'Shakespeare'),
])
def test_failed_download_is_one_line_and_leaves_no_file(
    tmp_path, monkeypatch, name, filename, display):
  calls = []

  def offline_urlopen(url, *args, **kwargs):  # What TFF sees with no network.
    calls.append(url)
    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

  monkeypatch.setattr(urllib.request, 'urlopen', offline_urlopen)
  start = time.monotonic()
  with pytest.raises(registry.DatasetUnavailableError) as info:
    registry.load_task(name, cache_dir=str(tmp_path))
  assert time.monotonic() - start < 5
  assert calls == [f'https://storage.googleapis.com/tff-datasets-public/'
                   f'{filename}.lzma']  # TFF's own downloader was used.
  message = str(info.value)
  assert '\n' not in message
  assert message == (
      f'{display} is not available offline: place {filename} in {tmp_path} '
      "(TFF's download failed: URLError: <urlopen error [Errno -3] Temporary "
      'failure in name resolution>)')
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert not os.path.exists(tmp_path / filename)


def test_partial_download_is_removed(tmp_path):
  path = tmp_path / 'emnist_all.sqlite'

  def load_fn(directory):
    with open(os.path.join(directory, 'emnist_all.sqlite'), 'wb') as f:
      f.write(b'half a file')
    raise ConnectionResetError('peer reset\nsecond line')

  with pytest.raises(offline.DatasetUnavailableError) as info:
    offline.load_tff_file('EMNIST', 'emnist_all.sqlite', load_fn, str(tmp_path))
  assert not path.exists()
  assert info.value.reason == (
      "TFF's download failed: ConnectionResetError: peer reset second line")


def test_existing_file_is_used_without_download(tmp_path):
  (tmp_path / 'x.sqlite').write_bytes(b'')
  seen = []
  assert offline.load_tff_file('X', 'x.sqlite', lambda d: seen.append(d) or 7,
                               str(tmp_path), download=False) == 7
  assert seen == [str(tmp_path)]


def test_default_cache_dir_is_tff_home(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert offline.resolve_cache_dir(None) == str(tmp_path / '.tff')


def test_short_reason_truncates_to_one_line():
  reason = offline.short_reason(OSError('x' * 500 + '\nmore'))
  assert '\n' not in reason and len(reason) == 160 and reason.endswith('...')


def test_unknown_dataset_and_option():
  with pytest.raises(ValueError, match=r"`dataset` must be one of \['emnist', "
                     r"'emnist62', 'shakespeare', 'digits', 'synthetic'.*\], got "
                     r"'mnist'"):
    registry.load_task('mnist')
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\] for "
                     r"dataset 'digits'"):
    registry.load_task('digits', colour='red')
  assert registry.DATASETS[:5] == ('emnist', 'emnist62', 'shakespeare',
                                   'digits', 'synthetic')
  assert 'num_unseen_users' in registry.dataset_options('emnist')
  assert 'only_digits' not in registry.dataset_options('emnist62')


def test_synthetic_through_registry():
  task = registry.load_task('synthetic', seed=3, num_users=4, num_unseen_users=2)
  assert len(task.client_ids) == 4 and len(task.unseen[0].client_ids) == 2
