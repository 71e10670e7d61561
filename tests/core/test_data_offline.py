"""Offline behaviour and the dataset switch: a missing TFF file gives one line
naming the file and the directory; unknown names/options are ValueErrors."""

import os
import time
import urllib.error
import urllib.request

import pytest

from perfed_tff import checks
from perfed_tff.data import offline
from perfed_tff.data import registry
from perfed_tff.data import synthetic


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
  task = registry.load_task('synthetic', num_users=2, model_heterogeneity=0,
                            input_heterogeneity=0.5)
  assert task.name == 'synthetic(0,0.5)'


def test_synthetic_heterogeneity_is_the_papers_alpha_and_beta():
  by_name = synthetic.generate_synthetic(
      model_heterogeneity=0.5, input_heterogeneity=2.0, num_users=3, seed=1)
  by_position = synthetic.generate_synthetic(0.5, 2.0, 3, seed=1)
  for (x1, y1), (x2, y2) in zip(by_name, by_position):
    assert (x1 == x2).all() and (y1 == y2).all()
  with pytest.raises(checks.ArgumentError,
                     match=r'^`input_heterogeneity` must be a number in '
                     r'\[0, 100\], got -1\.$'):
    synthetic.generate_synthetic(0.5, -1, 3, seed=1)


def test_old_synthetic_option_names_point_to_the_new_ones():
  with pytest.raises(checks.ArgumentError) as info:
    registry.load_task('synthetic', alpha=1, num_users=4)
  assert info.value.name == 'dataset_options'
  assert info.value.flag_message == (
      "--dataset_options: renamed option(s) of dataset 'synthetic': use "
      'model_heterogeneity instead of alpha')


def test_bad_option_value_is_named_as_a_dataset_option():
  """The loader's message, named `dataset_options` (the binaries' flag)."""
  with pytest.raises(checks.ArgumentError) as info:
    registry.load_task('digits', num_users=1)
  assert str(info.value) == '`num_users` must be an integer >= 2, got 1.'
  assert info.value.name == 'dataset_options'
  assert info.value.flag_message == ('--dataset_options: num_users must be an '
                                     'integer >= 2, got 1')
  with pytest.raises(checks.ArgumentError) as info:
    registry.load_task('emnist', download='yes')    # Before any file.
  assert info.value.flag_message == ("--dataset_options: download must be "
                                     "True or False, got 'yes'")
