"""Loading TFF's downloadable datasets offline, with a one-line error.

TFF's `load_data(cache_dir=...)` reads `<cache_dir>/<name>.sqlite` and, when
that file is missing, downloads `<name>.sqlite.lzma` from Google Cloud Storage
(no timeout, a multi-line stack trace when there is no network). Here:

* an existing file is used as is (no network access at all);
* a missing file is downloaded only when `download=True`, with a socket
  timeout of `download_timeout` seconds; a partial file is removed on failure;
* any failure raises `DatasetUnavailableError`, whose message is one line:
  "EMNIST is not available offline: place emnist_all.sqlite in /cache/dir
  (TFF's download failed: <short reason>)".
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional, TypeVar

from perfed_tff import checks

T = TypeVar('T')

DEFAULT_DOWNLOAD_TIMEOUT = 10.0
_MAX_REASON_CHARS = 160


class DatasetUnavailableError(ValueError):
  """A dataset file is missing and could not be downloaded.

  `str(error)` is a single line naming the file and the directory it belongs in.
  Attributes: `dataset`, `filename`, `cache_dir`, `reason`.
  """

  def __init__(self, dataset: str, filename: str, cache_dir: str, reason: str):
    self.dataset = dataset
    self.filename = filename
    self.cache_dir = cache_dir
    self.reason = short_reason(reason)
    super().__init__(
        f'{dataset} is not available offline: place {filename} in {cache_dir} '
        f'({self.reason})')


def short_reason(reason) -> str:
  """One line of at most 160 characters describing `reason` (str/exception)."""
  if isinstance(reason, BaseException):
    text = str(reason).strip() or type(reason).__name__
    if not str(reason).startswith(type(reason).__name__):
      text = f'{type(reason).__name__}: {text}'
  else:
    text = str(reason)
  text = ' '.join(text.split())  # Newlines and runs of spaces -> one space.
  if len(text) > _MAX_REASON_CHARS:
    text = text[:_MAX_REASON_CHARS - 3] + '...'
  return text


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
  """TFF's cache directory: `cache_dir`, or `~/.tff` when `None`."""
  directory = checks.nonempty_path('cache_dir', cache_dir, optional=True)
  return (os.path.join(os.path.expanduser('~'), '.tff') if directory is None
          else directory)


def load_tff_file(dataset: str, filename: str,
                  load_fn: Callable[[str], T], cache_dir: Optional[str], *,
                  download: bool = True,
                  download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> T:
  """Calls `load_fn(cache_dir)` (a TFF `load_data`) for `<cache_dir>/<filename>`.

  Args:
    dataset: display name for the error ('EMNIST', 'Shakespeare').
    filename: the uncompressed file TFF reads, e.g. 'emnist_all.sqlite'.
    load_fn: called with the resolved cache directory; downloads when the file
      is missing.
    cache_dir: TFF's cache directory (`None`: `~/.tff`).
    download: whether a missing file may be downloaded.
    download_timeout: socket timeout (seconds) while downloading.

  Raises:
    DatasetUnavailableError: the file is missing and not downloaded.
  """
  checks.boolean('download', download)
  download_timeout = checks.positive_float('download_timeout',
                                           download_timeout)
  directory = resolve_cache_dir(cache_dir)
  path = os.path.join(directory, filename)
  if os.path.isfile(path):
    try:
      return load_fn(directory)
    except Exception as e:  # pylint: disable=broad-except
      # An empty, truncated or foreign file (sqlite3.DatabaseError, ...):
      # one line naming it; the file is left as it is.
      raise DatasetUnavailableError(
          dataset, filename, directory,
          f'the file there cannot be read, replace it: {short_reason(e)}'
      ) from None
  if os.path.isdir(path):
    raise DatasetUnavailableError(dataset, filename, directory,
                                  f'{path} is a directory, not the file')
  if not download:
    raise DatasetUnavailableError(dataset, filename, directory,
                                  'download disabled')
  previous = socket.getdefaulttimeout()
  socket.setdefaulttimeout(download_timeout)
  try:
    return load_fn(directory)
  except Exception as e:  # pylint: disable=broad-except
    if os.path.exists(path):  # A partial download must not look complete.
      try:
        os.remove(path)
      except OSError:
        pass
    raise DatasetUnavailableError(
        dataset, filename, directory,
        f"TFF's download failed: {short_reason(e)}") from None
  finally:
    socket.setdefaulttimeout(previous)
