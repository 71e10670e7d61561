"""`perfed_tff.data.shakespeare_plays`: the speech/client rule on small texts,
the client ids, bad texts, the written `shakespeare.sqlite` read by TFF's own
`load_data` and by the project's registry, and the counts on the real
tinyshakespeare.txt."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.data import registry
from perfed_tff.data import shakespeare
from perfed_tff.data import shakespeare_plays as plays
from perfed_tff.data import sql_files


def _speech(speaker, *lines):
  return '\n'.join([f'{speaker}:', *lines])


def _text(*blocks, sep='\n\n'):
  return sep.join(blocks) + '\n'


# Two speakers, each with n speeches 'S<k>' (k = 1..n), alternating.
def _two_speakers(n):
  blocks = []
  for k in range(1, n + 1):
    blocks += [_speech('KENT', f'Kent {k}.'), _speech('LEAR', f'Lear {k}.')]
  return _text(*blocks)


@pytest.mark.parametrize('n,num_test', [(2, 1), (5, 1), (6, 2)])
def test_last_ceil_n_over_5_speeches_are_test(n, num_test):
  splits = plays.client_data_from_text(_two_speakers(n))
  assert sorted(splits) == ['test', 'train']
  for cid, name in (('KENT', 'Kent'), ('LEAR', 'Lear')):
    speeches = [f'{name} {k}.' for k in range(1, n + 1)]
    assert splits['train'][cid] == speeches[:n - num_test]
    assert splits['test'][cid] == speeches[n - num_test:]
  assert plays.num_test(n) == num_test


def test_blank_and_whitespace_only_lines_separate_speeches():
  tight = _text(_speech('KENT', 'Hark!', 'Who goes?'), _speech('LEAR', 'I.'),
                _speech('KENT', 'Away.'), _speech('LEAR', 'Stay.'))
  loose = ('\n \n' + _speech('KENT', 'Hark!', 'Who goes?') + '\n\n\n\t\n  \n'
           + _speech('LEAR', 'I.') + '\n \t \n' + _speech('KENT', 'Away.')
           + '\n\n\n\n' + _speech('LEAR', 'Stay.') + '\n   \n\n')
  expected = {'train': {'KENT': ['Hark!\nWho goes?'], 'LEAR': ['I.']},
              'test': {'KENT': ['Away.'], 'LEAR': ['Stay.']}}
  assert plays.client_data_from_text(tight) == expected
  assert plays.client_data_from_text(loose) == expected
  # Windows and old Mac line ends give the same clients.
  assert plays.client_data_from_text(loose.replace('\n', '\r\n')) == expected
  assert plays.client_data_from_text(loose.replace('\n', '\r')) == expected


def test_verse_lines_ending_in_colon_stay_in_the_speech():
  text = _text(
      _speech('KENT', 'Mark what I say:', 'the gods know this:', 'so be it.'),
      _speech('LEAR', 'Thus:'),
      _speech('KENT', 'Then:'),
      _speech('LEAR', 'Go.'))
  splits = plays.client_data_from_text(text)
  assert splits['train'] == {
      'KENT': ['Mark what I say:\nthe gods know this:\nso be it.'],
      'LEAR': ['Thus:']}
  assert splits['test'] == {'KENT': ['Then:'], 'LEAR': ['Go.']}
  # Only the first line of a block can name a speaker: no 'Mark what I say'.
  assert not any('Mark' in cid for cid in splits['train'])


def test_one_speech_speakers_and_non_speech_blocks_are_left_out():
  text = _text(
      'THE TRAGEDY OF KING LEAR\nAct I, scene 1',      # a title: no ':'
      _speech('KENT', 'Hark!'),
      '[Enter GLOUCESTER]',                             # a stage direction
      _speech('FOOL', 'Nuncle!'),                       # one speech only
      _speech('LEAR', 'Speak.'),
      'Exeunt: all but KENT and LEAR.',                 # ':' not at the end
      _speech('KENT', 'I will.'),
      _speech('LEAR', 'Now.'))
  splits = plays.client_data_from_text(text)
  assert splits == {'train': {'KENT': ['Hark!'], 'LEAR': ['Speak.']},
                    'test': {'KENT': ['I will.'], 'LEAR': ['Now.']}}
  assert plays.summary(splits) == (2, 2, 2)


def test_a_header_alone_is_a_speech_with_an_empty_snippet():
  text = _text(_speech('KENT'), _speech('LEAR', 'Speak.'),
               _speech('KENT', 'I will.'), _speech('LEAR'))
  splits = plays.client_data_from_text(text)
  assert splits['train'] == {'KENT': [''], 'LEAR': ['Speak.']}
  assert splits['test'] == {'KENT': ['I will.'], 'LEAR': ['']}


def test_client_ids_are_distinct_and_safe():
  assert plays.client_id('First Citizen') == 'First_Citizen'
  assert plays.client_id('KING RICHARD III') == 'KING_RICHARD_III'
  assert plays.client_id('Senators, &C') == 'Senators%2C_%26C'
  assert plays.client_id("Lady's Maid") == 'Lady%27s_Maid'
  assert plays.client_id('\u00c9mile') == '%C3%89mile'
  # Case is kept and '_' is escaped, so different speakers never share an id.
  names = ['PAGE', 'Page', 'A B', 'A_B', 'A%5FB', 'A  B']
  assert len({plays.client_id(n) for n in names}) == len(names)
  blocks = [_speech(name, f'{name} {k}') for k in range(2) for name in names]
  splits = plays.client_data_from_text(_text(*blocks))
  assert len(splits['train']) == len(names)
  for cid in splits['train']:
    assert all(c.isascii() and (c.isalnum() or c in '_%') for c in cid), cid


@pytest.mark.parametrize('text,message', [
    ('', 'the text is empty'),
    ('  \n\t\n\n', 'the text is empty'),
    ('KENT:\nHark\x00!\n', 'NUL characters'),
    ('Once upon a time.\n\nThe end.\n', 'no speech'),
    (_text(_speech('KENT', 'a'), _speech('LEAR', 'b'), _speech('KENT', 'c')),
     '1 speaker(s) with 2 or more speeches (3 speeches by 2 speakers); need '
     'at least 2 clients'),
    (_text(_speech('KENT', 'a'), _speech('LEAR', 'b')), '0 speaker(s)'),
    (_text(_speech('KENT', 'a'), _speech('LEAR', 'b'), ':\nwho?'),
     "line 7: a speech header names no speaker (':')"),
], ids=['empty', 'blank', 'nul', 'no_speech', 'one_client', 'no_client',
        'no_speaker'])
def test_bad_text(text, message):
  with pytest.raises(plays.PlaysTextError) as info:
    plays.client_data_from_text(text)
  assert isinstance(info.value, ValueError)
  assert message in str(info.value)
  assert '\n' not in str(info.value)


def test_text_must_be_str():
  with pytest.raises(TypeError, match='`text` must be a str, got bytes'):
    plays.client_data_from_text(b'KENT:\nHark!\n')


def test_read_text(tmp_path):
  good = tmp_path / 'plays.txt'
  good.write_bytes(b'\xef\xbb\xbfKENT:\nCaf\xc3\xa9!\n')
  assert plays.read_text(str(good)) == 'KENT:\nCaf\u00e9!\n'  # BOM dropped.
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes(b'KENT:\nCaf\xe9!\n')
  for path, message in (
      (tmp_path / 'missing.txt', 'missing.txt: no such file'),
      (tmp_path, 'is a directory, not a text file'),
      (latin1, 'latin1.txt is not UTF-8 text (byte 0xe9 at offset 9; a '
       'binary file?)')):
    with pytest.raises(plays.PlaysTextError) as info:
      plays.read_text(str(path))
    assert message in str(info.value)


# The project's loader and TFF's reader on a written file.

SMALL = _text(
    'A PLAY',
    _speech('First Citizen', 'Before we proceed any further, hear me speak.'),
    _speech('All', 'Speak, speak.'),
    _speech('First Citizen', 'You are all resolved', 'rather to die?'),
    _speech("Lady's Maid", 'Caf\u00e9 ~'),
    _speech('All', 'Resolved.'),
    _speech("Lady's Maid", 'Madam:'),
    _speech('All', 'Away!'),
    _speech('Lonely', 'Only once.'))


def _tff_snippets(client_data, cid):
  return [e['snippets'].numpy().decode('utf-8')
          for e in client_data.create_tf_dataset_for_client(cid)]


def test_tff_load_data_reads_the_written_file(tmp_path):
  expected = plays.client_data_from_text(SMALL)
  cache_dir = tmp_path / 'new' / 'cache'  # Created with its parent.
  path = plays.write_shakespeare_sqlite(SMALL, str(cache_dir))
  assert path == str(cache_dir / 'shakespeare.sqlite')
  assert sorted(os.listdir(cache_dir)) == ['shakespeare.sqlite']
  train, test = tff.simulation.datasets.shakespeare.load_data(
      cache_dir=str(cache_dir))
  ids = ['All', 'First_Citizen', 'Lady%27s_Maid']
  assert train.client_ids == ids and test.client_ids == ids
  assert train.element_type_structure == {
      'snippets': tf.TensorSpec([], tf.string)}
  for data, split in ((train, 'train'), (test, 'test')):
    for cid in ids:
      assert _tff_snippets(data, cid) == expected[split][cid]
  assert _tff_snippets(train, 'All') == ['Speak, speak.', 'Resolved.']
  assert _tff_snippets(test, 'All') == ['Away!']


def test_registry_loads_the_written_file_as_a_task(tmp_path):
  plays.write_shakespeare_sqlite(SMALL, str(tmp_path))
  task = registry.load_task('shakespeare', seed=0, cache_dir=str(tmp_path),
                            sequence_length=8, download=False)
  assert task.client_ids == ['All', 'First_Citizen', 'Lady%27s_Maid']
  assert task.name == 'shakespeare' and task.unseen is None
  first = next(iter(task.test.create_tf_dataset_for_client('Lady%27s_Maid')))
  # 'Madam:' -> [BOS, M, a, d, a, m, :, EOS, pad]: x = first 8, y = last 8.
  ids = np.concatenate([[shakespeare.BOS], shakespeare.encode('Madam:'),
                        [shakespeare.EOS], [shakespeare.PAD]])
  np.testing.assert_array_equal(first['x'], ids[:-1])
  np.testing.assert_array_equal(first['y'], ids[1:])


def test_written_from_splits_and_an_existing_file_is_replaced(tmp_path):
  plays.write_shakespeare_sqlite(SMALL, str(tmp_path))
  splits = {'train': {'A': ['one'], 'B': ['two']},
            'test': {'A': ['three'], 'B': [b'four']}}
  plays.write_shakespeare_sqlite(splits, str(tmp_path))
  train, test = tff.simulation.datasets.shakespeare.load_data(
      cache_dir=str(tmp_path))
  assert train.client_ids == ['A', 'B']
  assert _tff_snippets(test, 'B') == ['four']
  assert sorted(os.listdir(tmp_path)) == ['shakespeare.sqlite']
  with pytest.raises(TypeError, match='`text_or_splits` must be'):
    plays.write_shakespeare_sqlite({'train': {}}, str(tmp_path))


def test_nothing_is_written_for_a_bad_text(tmp_path):
  cache_dir = tmp_path / 'cache'
  with pytest.raises(plays.PlaysTextError, match='no speech'):
    plays.write_shakespeare_sqlite('Just prose.\n', str(cache_dir))
  assert not cache_dir.exists()


@pytest.mark.parametrize('where,message', [
    ('/proc', 'cannot write /proc/shakespeare.sqlite: unable to open '
     'database file'),
    ('/proc/perfed_tff_cache/sub', 'cannot write /proc/perfed_tff_cache/sub/'
     'shakespeare.sqlite: No such file or directory (/proc/perfed_tff_cache)'),
    ('{tmp}/a_file/sub', 'Not a directory'),
    ('{tmp}/dir_as_file', 'dir_as_file/shakespeare.sqlite: it is a '
     'directory'),
], ids=['proc', 'proc_sub', 'under_a_file', 'file_is_a_dir'])
def test_unwritable_cache_dir(tmp_path, where, message):
  (tmp_path / 'a_file').write_text('')
  (tmp_path / 'dir_as_file' / 'shakespeare.sqlite').mkdir(parents=True)
  before = sorted(p for p in tmp_path.rglob('*'))
  with pytest.raises(plays.CacheDirError) as info:
    plays.write_shakespeare_sqlite(SMALL, where.format(tmp=tmp_path))
  assert message in str(info.value) and '\n' not in str(info.value)
  assert sorted(p for p in tmp_path.rglob('*')) == before
  assert not os.path.exists('/proc/perfed_tff_cache')


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
  real_writer = sql_files.write_sql_client_data

  def interrupted(path, splits):
    real_writer(path + '.partial-source', splits)
    os.replace(path + '.partial-source', path + '.partial')  # Half-written.
    raise KeyboardInterrupt

  monkeypatch.setattr(sql_files, 'write_sql_client_data', interrupted)
  with pytest.raises(KeyboardInterrupt):
    plays.write_shakespeare_sqlite(SMALL, str(tmp_path / 'a' / 'b'))
  assert os.listdir(tmp_path) == []


def test_real_plays_text(shared_data, tmp_path):
  """tinyshakespeare.txt: 248 clients, 7,161 snippets, 1,526 of them test;
  TFF's reader and the registry see the same."""
  text = plays.read_text(os.path.join(shared_data, 'tinyshakespeare.txt'))
  splits = plays.client_data_from_text(text)
  assert plays.summary(splits) == (248, 7161 - 1526, 1526)
  assert set(splits['train']) == set(splits['test'])
  plays.write_shakespeare_sqlite(splits, str(tmp_path))
  train, test = tff.simulation.datasets.shakespeare.load_data(
      cache_dir=str(tmp_path))
  assert len(train.client_ids) == len(test.client_ids) == 248

  def count(data):
    return int(data.create_tf_dataset_from_all_clients().reduce(
        np.int64(0), lambda n, _: n + 1))

  assert (count(train), count(test)) == (7161 - 1526, 1526)
  assert _tff_snippets(train, 'First_Citizen')[0] == (
      'Before we proceed any further, hear me speak.')
  task = registry.load_task('shakespeare', seed=0, cache_dir=str(tmp_path),
                            download=False)
  assert len(task.client_ids) == 248
