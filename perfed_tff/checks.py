"""Argument checks shared by the library, the training program and the CLIs.

Every check raises `ArgumentError` (a `ValueError`) that names the argument.
Library callers see `` `alpha` must be a finite number > 0, got 0.0. ``; the
binaries print `e.flag_message` (``--alpha: must be ...``) and exit with
`EXIT_USAGE`. This module imports no TensorFlow.
"""

from __future__ import annotations

import ast
import math
import numbers
import os
from typing import Iterable, Optional

EXIT_USAGE = 2


class ArgumentError(ValueError):
  """A bad argument. `name`: the argument (= flag) name; `reason`: why."""

  def __init__(self, name: str, reason: str):
    super().__init__(f'`{name}` {reason}.')
    self.name = name
    self.reason = reason

  @property
  def flag_message(self) -> str:
    return f'--{self.name}: {self.reason}'

  def within(self, name: str) -> 'ArgumentError':
    """This error of an option held by the argument `name` (a dataset
    option in `dataset_options`): named `name` (``--dataset_options: a
    must be ...``), with the message of the option (`` `a` must be ...``)."""
    error = ArgumentError(name, f'{self.name} {self.reason}')
    error.args = self.args
    return error


def positive_float(name: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value <= 0):
    raise ArgumentError(name, f'must be a finite number > 0, got {value!r}')
  return float(value)


# Step sizes (alpha, beta, delta) must keep float32 updates meaningful: above
# MAX_STEP_SIZE one step moves weights by more than float32 can resolve
# sensibly (and 1e39 is inf in float32); below MIN_STEP_SIZE the step is lost
# in float32 rounding of any weight of magnitude >= 1e-5 (and 1e-320 is a
# float64 denormal that float32 flushes to 0).
MIN_STEP_SIZE = 1e-12
MAX_STEP_SIZE = 1e6


def step_size(name: str, value) -> float:
  """A float32-safe step size in [MIN_STEP_SIZE, MAX_STEP_SIZE]."""
  value = positive_float(name, value)
  if not MIN_STEP_SIZE <= value <= MAX_STEP_SIZE:
    raise ArgumentError(name, f'must be in [{MIN_STEP_SIZE:g}, '
                        f'{MAX_STEP_SIZE:g}] (a float32-safe step size), got '
                        f'{value!r}')
  return value


def bounded_float(name: str, value, minimum: float, maximum: float, *,
                  low_open: bool = False, high_open: bool = False) -> float:
  """A finite number in [minimum, maximum]; `low_open` / `high_open` leave
  out that end ((minimum, maximum], [minimum, maximum), ...)."""
  ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > minimum if low_open else value >= minimum)
        and (value < maximum if high_open else value <= maximum))
  if not ok:
    interval = (f'{"(" if low_open else "["}{minimum:g}, {maximum:g}'
                f'{")" if high_open else "]"}')
    raise ArgumentError(name, f'must be a number in {interval}, got '
                        f'{value!r}')
  return float(value)


def integer(name: str, value, minimum: int,
            maximum: Optional[int] = None) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum or (maximum is not None and value > maximum)):
    bound = (f'>= {minimum}' if maximum is None
             else f'in {minimum}..{maximum}')
    raise ArgumentError(name, f'must be an integer {bound}, got {value!r}')
  return int(value)


# The fewest training users a federated task (a data loader's `num_users`)
# may have.
MIN_USERS = 2


def at_most(name: str, value, maximum):
  """`value` (already checked to be a number) is <= `maximum`."""
  if value > maximum:
    raise ArgumentError(name, f'must be <= {maximum:g} (the meaningful '
                        f'range), got {value!r}')
  return value


def choice(name: str, value, choices: Iterable[str]) -> str:
  choices = list(choices)
  if value not in choices:
    raise ArgumentError(name, f'must be one of {choices}, got {value!r}')
  return value


def boolean(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise ArgumentError(name, f'must be True or False, got {value!r}')
  return value


def nonempty_path(name: str, value, *, optional: bool = False) -> Optional[str]:
  """A non-empty path (str or os.PathLike), made absolute with `~`
  expanded; None stays None when `optional`."""
  if optional and value is None:
    return None
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise ArgumentError(name, f'must be a non-empty path'
                        f'{" or None" if optional else ""}, got {value!r}')
  return os.path.abspath(os.path.expanduser(os.fspath(value)))


def writable_dir(name: str, path) -> str:
  """`path` is (or can be created as) a writable directory."""
  if not path or not isinstance(path, (str, os.PathLike)):
    raise ArgumentError(name, f'must be a directory path, got {path!r}')
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ArgumentError(name, f'{probe} exists and is not a directory '
                        f'(needed for {path})')
  if not os.access(probe, os.W_OK | os.X_OK) or not _can_create_in(probe):
    raise ArgumentError(name, f'directory {probe} is not writable (needed for '
                        f'{path}); pass a writable directory')
  return path


def _can_create_in(directory: str) -> bool:
  """Whether a directory can really be created in `directory` (`os.access`
  says yes for root under /proc, /sys and read-only mounts)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.perfed_tff_probe_', dir=directory))
    return True
  except OSError:
    return False


def existing_dir(name: str, path) -> Optional[str]:
  """`path` is None/empty (not given) or an existing directory."""
  if path is None or path == '':
    return None
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise ArgumentError(name, f'directory {path!r} does not exist; pass an '
                        'existing directory or leave it unset')
  return os.path.abspath(path)


def worker_addresses(name: str, value) -> tuple[str, ...]:
  """'host:port,host:port' (or a sequence of such) -> tuple of addresses."""
  if value is None or value == '' or value == ():
    return ()
  items = value.split(',') if isinstance(value, str) else list(value)
  addresses = []
  for item in items:
    item = str(item).strip()
    host, sep, port = item.rpartition(':')
    ok = bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536
    if not ok:
      raise ArgumentError(name, 'must be a comma-separated list of host:port '
                          f'(port 1-65535), got {item!r}')
    addresses.append(item)
  if len(set(addresses)) != len(addresses):
    raise ArgumentError(name, f'lists a worker more than once: {value!r}')
  return tuple(addresses)


def key_values(name: str, text) -> dict:
  """'key=value,key=value' (or a mapping) -> dict; values are Python
  literals when they parse, else strings."""
  if not text:
    return {}
  if isinstance(text, dict):
    return dict(text)
  out = {}
  for item in str(text).split(','):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not key.isidentifier():
      raise ArgumentError(name, 'must be a comma-separated list of key=value, '
                          f'got {item!r}')
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return out


def int_list(name: str, values, minimum: int = 0,
             maximum: Optional[int] = None) -> tuple[int, ...]:
  """A non-empty list of distinct integers in [minimum, maximum] ('1,2,3' or
  a sequence)."""
  if isinstance(values, str):
    values = [v for v in values.split(',') if v.strip()]
  out = []
  for v in values:
    try:
      out.append(int(str(v).strip()) if isinstance(v, str) else v)
    except ValueError:
      raise ArgumentError(name, f'must be integers, got {v!r}') from None
  if not out:
    raise ArgumentError(name, 'must not be empty')
  for v in out:
    integer(name, v, minimum, maximum)
  if len(set(out)) != len(out):
    raise ArgumentError(name, f'lists a value more than once: {out}')
  return tuple(int(v) for v in out)
