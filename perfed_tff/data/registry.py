"""One switch for every dataset: `load_task(name, cache_dir=..., seed=...)`.

| name          | data                                   | default model      |
|---------------|----------------------------------------|--------------------|
| emnist        | TFF federated EMNIST, 10 digits        | EMNIST CNN ('cnn') |
| emnist62      | TFF federated EMNIST, 62 characters    | EMNIST CNN ('cnn') |
| shakespeare   | TFF Shakespeare, next character        | 2-layer char LSTM  |
| digits        | sklearn 8x8 digits, label skew (n, c)  | 80-60 ELU MLP      |
| synthetic     | FedProx Synthetic(alpha, beta)         | softmax regression |
| paper_digits  | the paper's split (n, a) of 8x8 digits | 80-60 ELU MLP      |
| paper_mnist   | the paper's split of Keras MNIST       | 80-60 ELU MLP      |
| paper_cifar10 | the paper's split of Keras CIFAR-10    | 80-60 ELU MLP      |
| paper_emnist  | the paper's split of pooled EMNIST-10  | 80-60 ELU MLP      |

emnist/emnist62/shakespeare/paper_emnist read `<cache_dir>/emnist_all.sqlite`
or `<cache_dir>/shakespeare.sqlite` (default cache_dir `~/.tff`); a missing
file raises `DatasetUnavailableError` (one line) unless TFF can download it.
paper_mnist/paper_cifar10 read Keras's `<cache_dir>/mnist.npz` or
`<cache_dir>/cifar-10-batches-py/` (default cache_dir `~/.keras/datasets`; see
`keras_files`), with the same one-line error. The paper_* datasets are
described in `paper_datasets`.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from perfed_tff import checks
from perfed_tff.data import digits
from perfed_tff.data import emnist
from perfed_tff.data import offline
from perfed_tff.data import paper_datasets
from perfed_tff.data import shakespeare
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib

DatasetUnavailableError = offline.DatasetUnavailableError

# name: (loader, the loader's arguments the name fixes).
_LOADERS = {
    'emnist': (emnist.load_emnist, {'only_digits': True}),
    'emnist62': (emnist.load_emnist, {'only_digits': False}),
    'shakespeare': (shakespeare.load_shakespeare, {}),
    'digits': (digits.load_digits_task, {}),
    'synthetic': (synthetic.load_synthetic, {}),
    'paper_digits': (paper_datasets.load_paper_digits, {}),
    'paper_mnist': (paper_datasets.load_paper_mnist, {}),
    'paper_cifar10': (paper_datasets.load_paper_cifar10, {}),
    'paper_emnist': (paper_datasets.load_paper_emnist, {}),
}
DATASETS = tuple(_LOADERS)
# Loader arguments that are not dataset options (`load_task`'s own).
_OWN_ARGUMENTS = ('cache_dir', 'seed')
# Datasets read from files in `cache_dir`: their loaders take one.
DOWNLOADED = tuple(
    name for name, (loader, _) in _LOADERS.items()
    if 'cache_dir' in inspect.signature(loader).parameters)
# Options that were renamed: {dataset: {old name: new name}}.
_RENAMED_OPTIONS = {'synthetic': synthetic.RENAMED_OPTIONS}


def check_dataset(name: str) -> str:
  return checks.choice('dataset', name, DATASETS)


def dataset_options(name: str) -> tuple[str, ...]:
  """Keyword options `load_task` accepts for `name` (besides cache_dir, seed)."""
  loader, fixed = _LOADERS[check_dataset(name)]
  return tuple(p for p in inspect.signature(loader).parameters
               if p not in fixed and p not in _OWN_ARGUMENTS)


def check_options(name: str, options: Mapping[str, Any]) -> None:
  """Every key of `options` is an option of dataset `name` (their values are
  checked by its loader).

  Raises:
    checks.ArgumentError (`dataset_options`): an unknown option; one that
      was renamed names its new name.
  """
  accepted = dataset_options(name)
  unknown = sorted(set(options) - set(accepted))
  renamed = {old: new for old, new in _RENAMED_OPTIONS.get(name, {}).items()
             if old in unknown}
  if renamed:
    raise checks.ArgumentError(
        'dataset_options', f'renamed option(s) of dataset {name!r}: use '
        + ', '.join(f'{new} instead of {old}' for old, new in renamed.items()))
  if unknown:
    raise checks.ArgumentError(
        'dataset_options', f'unknown option(s) {unknown} for dataset '
        f'{name!r}; accepted: {list(accepted)}')


def load_task(name: str, *, cache_dir: Optional[str] = None, seed: int = 0,
              **options) -> task_lib.FederatedTask:
  """The `FederatedTask` of dataset `name` (one of DATASETS), with its default
  model unless `model=` says otherwise (emnist*: 'cnn'|'mlp'; digits:
  'mlp'|'linear').

  `cache_dir` is used by the datasets in DOWNLOADED (ignored by digits,
  synthetic and paper_digits, which need no files). Other options go to the
  loader, e.g. digits: num_users=50, classes_per_user=2, num_unseen_users=0,
  train_fraction=0.8; emnist/shakespeare: num_unseen_users, unseen_fraction,
  download; synthetic: model_heterogeneity, input_heterogeneity (the paper's
  alpha and beta), num_users, num_unseen_users; paper_*: num_users=50, a,
  num_unseen_users=0, train_fraction=0.8, model, background (and download for
  the file-backed ones). The loader checks their values.

  Raises:
    checks.ArgumentError (a ValueError): unknown dataset; an unknown option,
      or an option value the loader rejects (named `dataset_options`, the
      flag of the training binaries; the message names the option).
    DatasetUnavailableError (a ValueError): dataset file missing offline.
    ValueError: data that do not fit the options (e.g. too few examples).
  """
  check_options(name, options)
  loader, fixed = _LOADERS[name]
  kwargs = dict(options, seed=seed, **fixed)
  if name in DOWNLOADED:
    kwargs['cache_dir'] = cache_dir
  try:
    return loader(**kwargs)
  except checks.ArgumentError as e:
    if e.name not in dataset_options(name):
      raise
    raise e.within('dataset_options') from e
