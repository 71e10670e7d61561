"""Shakespeare clients from a plays text, written as TFF's `shakespeare.sqlite`.

Rule: the text is split into blocks at one or more blank lines (empty or only
whitespace); a block whose first line ends with `:` is a speech by the speaker
that line names (the line without the `:`, verbatim) and its other lines,
joined with `\\n`, are one snippet; other blocks are ignored; every speaker
with at least 2 speeches is one client, whose last ceil(n/5) speeches (in file
order) are its `test` snippets and the rest its `train` snippets, and speakers
with one speech are left out.

Client ids: the speaker name with each space replaced by `_`, ASCII letters
and digits kept (case too) and every other character written as `%XX` per
UTF-8 byte (e.g. 'First Citizen' -> 'First_Citizen', 'Senators, &C' ->
'Senators%2C_%26C'), so distinct speakers get distinct ids (the text names no
plays, so an id is the speaker only; 'PAGE' and 'Page' stay two clients) and
an id is safe inside TFF's SQL query (`client_id = '<id>'`, unescaped).

Line ends may be `\\n`, `\\r\\n` or `\\r`. A text that is empty, holds NUL
characters, names no speaker (a first line that is `:` alone or after
blanks), has no speech, or gives fewer than 2 clients raises `PlaysTextError`
(a `ValueError` with a one-line message). On tinyshakespeare.txt (char-rnn's
40,000 lines) this gives 248 clients and 7,161 snippets, 1,526 of them test.

`write_shakespeare_sqlite` writes `<cache_dir>/shakespeare.sqlite` in TFF's
SQL format (`perfed_tff.data.sql_files`; splits `train`/`test`, feature
`snippets`), which `tff.simulation.datasets.shakespeare.load_data(cache_dir)`
and `registry.load_task('shakespeare', cache_dir=...)` read offline. Parsing
imports no TensorFlow; writing does.
"""

from __future__ import annotations

import math
import os
import sqlite3
from typing import Mapping, Sequence, Union

FILENAME = 'shakespeare.sqlite'
SPLITS = ('train', 'test')
MIN_SPEECHES = 2  # Per client.
MIN_CLIENTS = 2
TEST_FRACTION = 5  # The last ceil(n / 5) speeches are test.

Splits = Mapping[str, Mapping[str, Sequence[str]]]


class PlaysTextError(ValueError):
  """The plays text (or its file) cannot give Shakespeare clients; the message
  is one line."""


class CacheDirError(ValueError):
  """`shakespeare.sqlite` cannot be written in the cache directory; the
  message is one line. Nothing was left behind."""


def client_id(speaker: str) -> str:
  """The client id of `speaker` (see the module docstring)."""
  out = []
  for ch in speaker:
    if ch == ' ':
      out.append('_')
    elif ch.isascii() and ch.isalnum():
      out.append(ch)
    else:
      out.extend(f'%{b:02X}' for b in ch.encode('utf-8'))
  return ''.join(out)


def num_test(num_speeches: int) -> int:
  """Test snippets of a client with `num_speeches` speeches: ceil(n / 5)."""
  return math.ceil(num_speeches / TEST_FRACTION)


def speeches(text: str) -> list[tuple[str, str]]:
  """[(speaker, snippet)] of every speech in `text`, in file order.

  Raises:
    PlaysTextError: NUL characters or a speech naming no speaker.
    TypeError: `text` is not a str.
  """
  if not isinstance(text, str):
    raise TypeError(f'`text` must be a str, got {type(text).__name__}.')
  if '\x00' in text:
    raise PlaysTextError('the text holds NUL characters (a binary file?)')
  lines = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')
  out = []
  block, start = [], 0
  for number, line in enumerate(lines + [''], start=1):
    if line.strip():
      if not block:
        start = number
      block.append(line)
      continue
    if block and block[0].endswith(':'):
      speaker = block[0][:-1]
      if not speaker.strip():
        raise PlaysTextError(f'line {start}: a speech header names no speaker '
                             f'({block[0]!r})')
      out.append((speaker, '\n'.join(block[1:])))
    block = []
  return out


def client_data_from_text(text: str) -> dict[str, dict[str, list[str]]]:
  """{'train': {client id: [snippet]}, 'test': {client id: [snippet]}} of the
  plays `text` by the module's rule; ids sorted, snippets in file order, every
  client in both splits.

  Raises:
    PlaysTextError: a bad text (see the module docstring).
    TypeError: `text` is not a str.
  """
  if isinstance(text, str) and not text.strip():
    raise PlaysTextError('the text is empty')
  found = speeches(text)
  if not found:
    raise PlaysTextError('no speech: no block of lines begins with a line '
                         'ending in ":"')
  by_speaker: dict[str, list[str]] = {}
  for speaker, snippet in found:
    by_speaker.setdefault(speaker, []).append(snippet)
  clients = {client_id(s): v for s, v in by_speaker.items()
             if len(v) >= MIN_SPEECHES}
  if len(clients) < MIN_CLIENTS:
    raise PlaysTextError(
        f'{len(clients)} speaker(s) with {MIN_SPEECHES} or more speeches '
        f'({len(found)} speeches by {len(by_speaker)} speakers); need at '
        f'least {MIN_CLIENTS} clients')
  splits = {'train': {}, 'test': {}}
  for cid in sorted(clients):
    snippets = clients[cid]
    cut = len(snippets) - num_test(len(snippets))
    splits['train'][cid] = snippets[:cut]
    splits['test'][cid] = snippets[cut:]
  return splits


def read_text(path: str) -> str:
  """The UTF-8 text of the file at `path` (a leading BOM dropped).

  Raises:
    PlaysTextError: missing, a directory, unreadable or not UTF-8 text.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise PlaysTextError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise PlaysTextError(f'{path} is a directory, not a text file') from None
  except OSError as e:
    raise PlaysTextError(
        f'{path}: cannot read it: {e.strerror or type(e).__name__}') from None
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise PlaysTextError(
        f'{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset '
        f'{e.start}; a binary file?)') from None


def summary(splits: Splits) -> tuple[int, int, int]:
  """(clients, train snippets, test snippets) of `splits`."""
  return (len(splits['train']),
          sum(len(v) for v in splits['train'].values()),
          sum(len(v) for v in splits['test'].values()))


def _check_splits(splits) -> Splits:
  if not isinstance(splits, Mapping) or set(splits) != set(SPLITS):
    raise TypeError('`text_or_splits` must be the plays text or a mapping '
                    "{'train': {...}, 'test': {...}} of client snippets, got "
                    f'{type(splits).__name__}.')
  return splits


def _make_dirs(directory: str) -> list[str]:
  """Creates `directory` and its missing parents; returns those it created
  (outermost first). On failure removes them again and raises."""
  missing = []
  d = directory
  while not os.path.exists(d):
    missing.append(d)
    parent = os.path.dirname(d)
    if parent == d:
      break
    d = parent
  created = []
  try:
    for d in reversed(missing):
      os.mkdir(d)
      created.append(d)
  except BaseException:
    _remove_dirs(created)
    raise
  return created


def _remove_dirs(created: list[str]) -> None:
  for d in reversed(created):
    try:
      os.rmdir(d)
    except OSError:
      pass


def write_shakespeare_sqlite(text_or_splits: Union[str, Splits],
                             cache_dir: str) -> str:
  """Writes `<cache_dir>/shakespeare.sqlite` and returns its path.

  Args:
    text_or_splits: the plays text, or the splits `client_data_from_text`
      returns (snippets str or bytes).
    cache_dir: the directory (created with its parents when missing); an
      existing `shakespeare.sqlite` there is replaced.

  The text is parsed before anything is written; the file appears whole or
  not at all, and on failure the directories made here are removed again.

  Raises:
    PlaysTextError: a bad text.
    CacheDirError: the file cannot be written there.
  """
  splits = (client_data_from_text(text_or_splits)
            if isinstance(text_or_splits, str)
            else _check_splits(text_or_splits))
  if (not isinstance(cache_dir, (str, os.PathLike))
      or not os.fspath(cache_dir)):
    raise CacheDirError(f'the cache directory must be a non-empty path, got '
                        f'{cache_dir!r}')
  from perfed_tff.data import sql_files  # pylint: disable=g-import-not-at-top
  protos = {split: {cid: [sql_files.shakespeare_example(s) for s in snippets]
                    for cid, snippets in splits[split].items()}
            for split in SPLITS}
  directory = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
  path = os.path.join(directory, FILENAME)
  if os.path.isdir(path):
    raise CacheDirError(f'cannot write {path}: it is a directory')
  created = []
  try:
    created = _make_dirs(directory)
    return sql_files.write_sql_client_data(path, protos)
  except BaseException as e:
    partial = f'{path}.partial'  # sql_files' temporary name.
    if os.path.isfile(partial):
      try:
        os.remove(partial)
      except OSError:
        pass
    _remove_dirs(created)
    if isinstance(e, OSError):
      reason = e.strerror or type(e).__name__
      if e.filename and os.fspath(e.filename) != path:
        reason += f' ({e.filename})'
      raise CacheDirError(f'cannot write {path}: {reason}') from None
    if isinstance(e, sqlite3.Error):
      raise CacheDirError(f'cannot write {path}: {e}') from None
    raise
