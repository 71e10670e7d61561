"""The optional outer ring's runtime: a TFF execution context whose C++
workers this library owns (`execution`), the local worker processes
(`local_worker`), kept on loopback (`loopback`), their errors
(`worker_errors`), run supervision (`supervision`: deadlines, worker health,
signals ending the calls in flight) and the worker binary
(`python -m perfed_tff.runtime.worker`).

It is written against TensorFlow Federated's internals of one version,
`TFF_VERSION`, and refuses any other on import, in one line that says how to
run without it: the library and the training program need none of it
(`TrainingConfig(runtime='tff')`, `--runtime=tff` in the binaries).

    with perfed_tff.runtime.ExecutionContext():   # or ExecutionContext() once
      state = process.initialize()

Nothing here runs at import time beyond that version check (read from the
installed package's metadata: no TensorFlow is imported); TFF's own default
context is left as is until an `ExecutionContext` is opened, and closing it
reinstalls the context that was current before.
"""

import importlib
import importlib.metadata

TFF_VERSION = '0.87.0'


class UnsupportedTFFVersionError(ImportError):
  """The installed tensorflow-federated is not `TFF_VERSION`."""


def _check_tff_version() -> None:
  try:
    found = importlib.metadata.version('tensorflow-federated')
  except importlib.metadata.PackageNotFoundError:
    found = None
  if found != TFF_VERSION:
    raise UnsupportedTFFVersionError(
        f'perfed_tff.runtime and perfed_tff.accelerator are written for '
        f'tensorflow-federated {TFF_VERSION}, found {found or "none"}; run '
        "without them: TrainingConfig(runtime='tff') in the library, "
        '--runtime=tff in the binaries')


_check_tff_version()

_LAZY = {
    'ExecutionContext': ('perfed_tff.runtime.execution', 'ExecutionContext'),
    'WorkerProcess': ('perfed_tff.runtime.local_worker', 'WorkerProcess'),
    'WorkerComputationError': ('perfed_tff.runtime.worker_errors',
                               'WorkerComputationError'),
    'WorkerUnavailableError': ('perfed_tff.runtime.worker_errors',
                               'WorkerUnavailableError'),
}
__all__ = sorted(_LAZY) + ['TFF_VERSION', 'UnsupportedTFFVersionError']


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
