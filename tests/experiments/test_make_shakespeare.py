"""`experiments/make_shakespeare.py` as a subprocess: a plays text becomes
`<cache_dir>/shakespeare.sqlite` with a one-line summary; every bad text or
unusable --cache_dir gives one error line, exit status 2 and writes nothing."""

import os
import sqlite3

import pytest

from tests import binary_helpers as h

MODULE = 'experiments.make_shakespeare'
PROGRAM = 'make_shakespeare.py'

PLAYS = ('A PLAY\n\n'
         'KENT:\nHark!\nWho goes there:\n\n \n'
         'LEAR:\nSpeak.\n\n'
         'FOOL:\nNuncle!\n\n'
         'KENT:\nI will.\n\n'
         'LEAR:\nNow.\n\n'
         'LEAR:\nGo.\n')


def _run(*flags):
  return h.run(*flags, module=MODULE, timeout=120)


def test_writes_the_file_and_prints_a_summary(tmp_path):
  text = tmp_path / 'plays.txt'
  text.write_text(PLAYS)
  cache_dir = tmp_path / 'new' / 'cache'
  r = _run(f'--text={text}', f'--cache_dir={cache_dir}')
  assert r.returncode == 0, r.stderr[-3000:]
  path = cache_dir / 'shakespeare.sqlite'
  # KENT: 2 speeches (1 test), LEAR: 3 (1 test); FOOL has one: left out.
  assert r.stdout.splitlines() == [
      f'2 clients, 5 snippets (3 train, 2 test): {path}']
  assert not h.error_lines(r.stderr, PROGRAM)
  assert sorted(os.listdir(cache_dir)) == ['shakespeare.sqlite']
  with sqlite3.connect(path) as con:
    rows = con.execute('SELECT split_name, client_id, num_examples FROM '
                       'client_metadata ORDER BY 1, 2').fetchall()
  assert rows == [('test', 'KENT', 1), ('test', 'LEAR', 1),
                  ('train', 'KENT', 1), ('train', 'LEAR', 2)]


def _write(name, data):
  def prepare(tmp_path):
    path = tmp_path / name
    if data is not None:
      path.write_bytes(data)
    return path
  return prepare


ONE_CLIENT = b'KENT:\na\n\nLEAR:\nb\n\nKENT:\nc\n'


@pytest.mark.parametrize('prepare,expected', [
    (_write('missing.txt', None), '--text: {text}: no such file'),
    (_write('empty.txt', b''), '--text: {text}: the text is empty'),
    (_write('blank.txt', b'\n \n\t\n'), '--text: {text}: the text is empty'),
    (_write('binary.bin', b'\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00'),
     '--text: {text} is not UTF-8 text (byte 0xff at offset 8; a binary '
     'file?)'),
    (_write('nul.txt', b'KENT:\nHark\x00\n\nLEAR:\nNo\n'),
     '--text: {text}: the text holds NUL characters (a binary file?)'),
    (_write('prose.txt', b'Once upon a time.\n\nThe end.\n'),
     '--text: {text}: no speech: no block of lines begins with a line ending '
     'in ":"'),
    (_write('one_client.txt', ONE_CLIENT),
     '--text: {text}: 1 speaker(s) with 2 or more speeches (3 speeches by 2 '
     'speakers); need at least 2 clients'),
    (lambda tmp_path: tmp_path, '--text: {text} is a directory, not a text '
     'file'),
], ids=['missing', 'empty', 'blank', 'binary', 'nul', 'no_speech',
        'one_client', 'directory'])
def test_bad_text(tmp_path, prepare, expected):
  text = prepare(tmp_path)
  cache_dir = tmp_path / 'cache'
  before = h.snapshot(tmp_path)
  r = _run(f'--text={text}', f'--cache_dir={cache_dir}')
  line = h.assert_one_error_line(r.stderr, PROGRAM)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert line == f'{PROGRAM}: error: ' + expected.format(text=text)
  assert r.stdout == ''
  assert h.snapshot(tmp_path) == before
  assert not cache_dir.exists()


def test_bad_text_keeps_an_existing_file(tmp_path):
  text = tmp_path / 'prose.txt'
  text.write_text('No speaker here.\n')
  cache_dir = tmp_path / 'cache'
  cache_dir.mkdir()
  (cache_dir / 'shakespeare.sqlite').write_bytes(b'the old file')
  before = h.snapshot(tmp_path)
  r = _run(f'--text={text}', f'--cache_dir={cache_dir}')
  assert 'no speech' in h.assert_one_error_line(r.stderr, PROGRAM)
  assert r.returncode == 2
  assert h.snapshot(tmp_path) == before


@pytest.mark.parametrize('cache_dir,expected', [
    ('/proc', '--cache_dir: cannot write /proc/shakespeare.sqlite: unable to '
     'open database file'),
    ('/proc/perfed_tff_cache/sub', '--cache_dir: cannot write '
     '/proc/perfed_tff_cache/sub/shakespeare.sqlite: No such file or '
     'directory (/proc/perfed_tff_cache)'),
    ('{tmp}/a_file/sub', '--cache_dir: cannot write {tmp}/a_file/sub/'
     'shakespeare.sqlite: Not a directory ({tmp}/a_file/sub)'),
], ids=['proc', 'proc_sub', 'under_a_file'])
def test_unwritable_cache_dir(tmp_path, cache_dir, expected):
  text = tmp_path / 'plays.txt'
  text.write_text(PLAYS)
  (tmp_path / 'a_file').write_text('')
  before = h.snapshot(tmp_path)
  r = _run(f'--text={text}', '--cache_dir=' + cache_dir.format(tmp=tmp_path))
  line = h.assert_one_error_line(r.stderr, PROGRAM)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert line == f'{PROGRAM}: error: ' + expected.format(tmp=tmp_path)
  assert h.snapshot(tmp_path) == before


def test_missing_flag(tmp_path):
  r = _run(f'--cache_dir={tmp_path / "cache"}')
  line = h.assert_one_error_line(r.stderr, PROGRAM)
  assert r.returncode == 2
  assert '--text must have a value other than None' in line
  assert not (tmp_path / 'cache').exists()
