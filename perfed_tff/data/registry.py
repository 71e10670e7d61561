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
from typing import Optional

from perfed_tff.data import digits
from perfed_tff.data import emnist
from perfed_tff.data import offline
from perfed_tff.data import paper_datasets
from perfed_tff.data import shakespeare
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib

DatasetUnavailableError = offline.DatasetUnavailableError

DATASETS = ('emnist', 'emnist62', 'shakespeare', 'digits', 'synthetic',
            'paper_digits', 'paper_mnist', 'paper_cifar10', 'paper_emnist')
DOWNLOADED = ('emnist', 'emnist62', 'shakespeare', 'paper_mnist',
              'paper_cifar10', 'paper_emnist')  # need cache_dir files
FILENAMES = {'emnist': emnist.FILENAME, 'emnist62': emnist.FILENAME,
             'shakespeare': shakespeare.FILENAME,
             'paper_mnist': 'mnist.npz',
             'paper_cifar10': 'cifar-10-batches-py',
             'paper_emnist': emnist.FILENAME}

_LOADERS = {
    'emnist': lambda **kw: emnist.load_emnist(only_digits=True, **kw),
    'emnist62': lambda **kw: emnist.load_emnist(only_digits=False, **kw),
    'shakespeare': shakespeare.load_shakespeare,
    'digits': digits.load_digits_task,
    'synthetic': synthetic.load_synthetic,
    'paper_digits': paper_datasets.load_paper_digits,
    'paper_mnist': paper_datasets.load_paper_mnist,
    'paper_cifar10': paper_datasets.load_paper_cifar10,
    'paper_emnist': paper_datasets.load_paper_emnist,
}
_SIGNATURES = {
    'emnist': emnist.load_emnist, 'emnist62': emnist.load_emnist,
    'shakespeare': shakespeare.load_shakespeare,
    'digits': digits.load_digits_task, 'synthetic': synthetic.load_synthetic,
    'paper_digits': paper_datasets.load_paper_digits,
    'paper_mnist': paper_datasets.load_paper_mnist,
    'paper_cifar10': paper_datasets.load_paper_cifar10,
    'paper_emnist': paper_datasets.load_paper_emnist,
}
_FIXED = {'emnist': ('only_digits', 'cache_dir', 'seed'),
          'emnist62': ('only_digits', 'cache_dir', 'seed'),
          'shakespeare': ('cache_dir', 'seed'),
          'digits': ('seed',), 'synthetic': ('seed',),
          'paper_digits': ('seed',),
          'paper_mnist': ('cache_dir', 'seed'),
          'paper_cifar10': ('cache_dir', 'seed'),
          'paper_emnist': ('cache_dir', 'seed')}


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

  `cache_dir` is used by the datasets in DOWNLOADED (ignored by digits,
  synthetic and paper_digits, which need no files). Other options go to the
  loader, e.g. digits: num_users=50, classes_per_user=2, num_unseen_users=0,
  train_fraction=0.8; emnist/shakespeare: num_unseen_users, unseen_fraction,
  download; synthetic: alpha, beta, num_users, num_unseen_users; paper_*:
  num_users=50, a, num_unseen_users=0, train_fraction=0.8, model, background
  (and download for the file-backed ones).

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
