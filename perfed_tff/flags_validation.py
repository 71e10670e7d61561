"""Checks of the training program's arguments, before any work starts.

Every check raises `UsageError`, whose message is one line naming the flag and
the accepted values (`--alpha: must be a finite number > 0, got -1`). The
binaries print it and exit with status 2. This module imports no TensorFlow.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Optional, Sequence

EXIT_USAGE = 2


class UsageError(ValueError):
  """A bad argument: `flag` is the flag's name (without dashes)."""

  def __init__(self, flag: str, message: str):
    super().__init__(f'--{flag}: {message}')
    self.flag = flag


def check_positive_float(flag: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value <= 0):
    raise UsageError(flag, f'must be a finite number > 0, got {value!r}')
  return float(value)


def check_int(flag: str, value, minimum: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise UsageError(flag, f'must be an integer >= {minimum}, got {value!r}')
  return int(value)


def check_choice(flag: str, value, choices: Iterable[str]) -> str:
  choices = list(choices)
  if value not in choices:
    raise UsageError(flag, f'must be one of {choices}, got {value!r}')
  return value


def check_writable_dir(flag: str, path) -> str:
  """`path` is (or can be created as) a writable directory."""
  if not path or not isinstance(path, (str, os.PathLike)):
    raise UsageError(flag, f'must be a directory path, got {path!r}')
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise UsageError(flag, f'{probe} exists and is not a directory '
                     f'(needed for {path})')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UsageError(flag, f'directory {probe} is not writable (needed for '
                     f'{path}); pass a writable directory')
  return path


def check_existing_dir(flag: str, path) -> Optional[str]:
  """`path` is None/empty (not given) or an existing directory."""
  if path is None or path == '':
    return None
  if not os.path.isdir(path):
    raise UsageError(flag, f'directory {path!r} does not exist; pass an '
                     'existing directory or leave the flag unset')
  return os.path.abspath(path)


def parse_workers(flag: str, value) -> tuple[str, ...]:
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
      raise UsageError(flag, f'must be a comma-separated list of host:port '
                       f'(port 1-65535), got {item!r}')
    addresses.append(item)
  if len(set(addresses)) != len(addresses):
    raise UsageError(flag, f'lists a worker more than once: {value!r}')
  return tuple(addresses)


def check_clients_per_round(clients_per_round: int, population: int,
                            dataset: str) -> int:
  if clients_per_round > population:
    raise UsageError('clients_per_round', f'must be between 1 and the '
                     f'population of {dataset!r} ({population} clients), got '
                     f'{clients_per_round}')
  return clients_per_round


def dataset_names() -> Sequence[str]:
  """Names `--dataset` accepts (the registry's, once it exists)."""
  try:
    from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ('synthetic',)
  return tuple(registry.DATASETS)


def validate_config(config, *, algorithms: Sequence[str],
                    datasets: Optional[Sequence[str]] = None,
                    client_weightings: Sequence[str] = ('uniform',
                                                        'num_examples')):
  """Checks every field of a `TrainingConfig`; returns a normalized copy.

  Raises:
    UsageError: the first bad field.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  check_choice('algorithm', config.algorithm, algorithms)
  check_choice('dataset', config.dataset,
               datasets if datasets is not None else dataset_names())
  check_choice('client_weighting', config.client_weighting, client_weightings)
  check_choice('graph_optimization', config.graph_optimization,
               ('auto', 'runtime', 'tff'))
  changes = dict(
      alpha=check_positive_float('alpha', config.alpha),
      beta=check_positive_float('beta', config.beta),
      delta=check_positive_float('delta', config.delta),
      rounds=check_int('rounds', config.rounds, 1),
      clients_per_round=check_int('clients_per_round',
                                  config.clients_per_round, 1),
      local_steps=check_int('local_steps', config.local_steps, 1),
      batch_size=check_int('batch_size', config.batch_size, 1),
      seed=check_int('seed', config.seed, 0),
      checkpoint_every=check_int('checkpoint_every', config.checkpoint_every,
                                 1),
      keep_checkpoints=check_int('keep_checkpoints', config.keep_checkpoints,
                                 1),
      eval_every=check_int('eval_every', config.eval_every, 0),
      eval_clients=check_int('eval_clients', config.eval_clients, 0),
      worker_timeout=check_positive_float('worker_timeout',
                                          config.worker_timeout),
      workers=parse_workers('workers', config.workers),
      root_output_dir=check_writable_dir('root_output_dir',
                                         config.root_output_dir),
      cache_dir=check_existing_dir('cache_dir', config.cache_dir),
      dataset_options=parse_options('dataset_options',
                                    config.dataset_options),
  )
  return dataclasses.replace(config, **changes)


def parse_options(flag: str, text) -> dict:
  """'key=value,key=value' -> dict (values as Python literals when they
  parse, else strings)."""
  import ast  # pylint: disable=g-import-not-at-top
  if not text:
    return {}
  if isinstance(text, dict):
    return dict(text)
  out = {}
  for item in str(text).split(','):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or not key.isidentifier():
      raise UsageError(flag, f'must be a comma-separated list of key=value, '
                       f'got {item!r}')
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return out
