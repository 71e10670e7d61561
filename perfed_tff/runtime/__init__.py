"""Everything that touches TFF's runtime internals: execution contexts that own
their C++ workers (`execution`), how computations are compiled for the worker
(`compilation`), rounds several per invocation (`multi_round`) and as one
TensorFlow computation (`fused_round`), the local worker processes (`local_worker`), kept on
loopback (`loopback`), their errors (`worker_errors`), interrupts
(`interrupts`), run supervision (`supervision`) and the worker binary
(`python -m perfed_tff.runtime.worker`).

Open the project's context with one line before running computations:

    with perfed_tff.runtime.ExecutionContext():   # or ExecutionContext() once
      state = process.initialize()

Nothing here runs at import time; TFF's own default context is left as is
until an `ExecutionContext` is opened.
"""

import importlib

_LAZY = {
    'ExecutionContext': ('perfed_tff.runtime.execution', 'ExecutionContext'),
    'WorkerProcess': ('perfed_tff.runtime.local_worker', 'WorkerProcess'),
    'WorkerComputationError': ('perfed_tff.runtime.worker_errors',
                               'WorkerComputationError'),
    'WorkerUnavailableError': ('perfed_tff.runtime.worker_errors',
                               'WorkerUnavailableError'),
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
