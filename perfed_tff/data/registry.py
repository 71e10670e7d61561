"""One switch for every dataset: `load_task(name, cache_dir=..., seed=...)`.

| name        | data                                   | default model        |
|-------------|----------------------------------------|----------------------|
| emnist      | TFF federated EMNIST, 10 digits        | EMNIST CNN ('cnn')   |
| emnist62    | TFF federated EMNIST, 62 characters    | EMNIST CNN ('cnn')   |
| shakespeare | TFF Shakespeare, next character        | 2-layer char LSTM    |
| digits      | sklearn 8x8 digits, label skew (n, c)  | 80-60 ELU MLP        |
| synthetic   | FedProx Synthetic(alpha, beta)         | softmax regression   |

emnist/emnist62/shakespeare read `<cache_dir>/emnist_all.sqlite` or
`<cache_dir>/shakespeare.sqlite` (default cache_dir `~/.tff`); a missing file
raises `DatasetUnavailableError` (one line) unless TFF can download it.
"""

from __future__ import annotations

import inspect
from typing import Optional

from perfed_tff.data import digits
from perfed_tff.data import emnist
from perfed_tff.data import offline
from perfed_tff.data import shakespeare
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib

DatasetUnavailableError = offline.DatasetUnavailableError

DATASETS = ('emnist', 'emnist62', 'shakespeare', 'digits', 'synthetic')
DOWNLOADED = ('emnist', 'emnist62', 'shakespeare')  # need cache_dir files
FILENAMES = {'emnist': emnist.FILENAME, 'emnist62': emnist.FILENAME,
             'shakespeare': shakespeare.FILENAME}

_LOADERS = {
    'emnist': lambda **kw: emnist.load_emnist(only_digits=True, **kw),
    'emnist62': lambda **kw: emnist.load_emnist(only_digits=False, **kw),
    'shakespeare': shakespeare.load_shakespeare,
    'digits': digits.load_digits_task,
    'synthetic': synthetic.load_synthetic,
}
_SIGNATURES = {
    'emnist': emnist.load_emnist, 'emnist62': emnist.load_emnist,
    'shakespeare': shakespeare.load_shakespeare,
    'digits': digits.load_digits_task, 'synthetic': synthetic.load_synthetic,
}
_FIXED = {'emnist': ('only_digits', 'cache_dir', 'seed'),
          'emnist62': ('only_digits', 'cache_dir', 'seed'),
          'shakespeare': ('cache_dir', 'seed'),
          'digits': ('seed',), 'synthetic': ('seed',)}


def check_dataset(name: str) -> str:
  if name not in DATASETS:
    raise ValueError(f'`dataset` must be one of {list(DATASETS)}, got {name!r}.')
  return name


def dataset_options(name: str) -> tuple[str, ...]:
  """Keyword options `load_task` accepts for `name` (besides cache_dir, seed)."""
  params = inspect.signature(_SIGNATURES[check_dataset(name)]).parameters
  return tuple(p for p in params if p not in _FIXED[name])


def load_task(name: str, *, cache_dir: Optional[str] = None, seed: int = 0,
              **dataset_options_) -> task_lib.FederatedTask:
  """The `FederatedTask` of dataset `name` (one of DATASETS), with its default
  model unless `model=` says otherwise (emnist*: 'cnn'|'mlp'; digits:
  'mlp'|'linear').

  `cache_dir` is used by emnist, emnist62 and shakespeare (ignored by digits
  and synthetic, which need no files). Other options go to the loader, e.g.
  digits: num_users=50, classes_per_user=2, num_unseen_users=0,
  train_fraction=0.8; emnist/shakespeare: num_unseen_clients, unseen_fraction,
  download; synthetic: alpha, beta, num_users, num_unseen_users.

  Raises:
    ValueError: unknown dataset or option.
    DatasetUnavailableError (a ValueError): dataset file missing offline.
  """
  check_dataset(name)
  accepted = dataset_options(name)
  unknown = sorted(set(dataset_options_) - set(accepted))
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} for dataset {name!r}; '
                     f'accepted: {list(accepted)}.')
  kwargs = dict(dataset_options_, seed=seed)
  if name in DOWNLOADED:
    kwargs['cache_dir'] = cache_dir
  return _LOADERS[name](**kwargs)
