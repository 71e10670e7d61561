"""The optional outer ring's accelerator: the same rounds, weights and
metrics as TFF's own execution, in less time.

* `context.AcceleratedContext`: the owned runtime's `ExecutionContext`
  (`perfed_tff.runtime`) with computations compiled once and created on the
  worker once (`computation_keeping`, `compiled_cache`), and Grappler where
  it pays (`compilation`);
* K rounds per TFF invocation (`multi_round`) and a round of N clients as one
  TensorFlow computation (`fused_round`), run by the training program in
  blocks between checkpoints and evaluations (`round_blocks`);
* the traced computations of a run kept across runs (`computation_cache`,
  `computation_store`);
* FedAvg with less fixed cost per client (`fed_avg`).

Like the runtime, it is written against TFF's internals of one version and
refuses any other on import (`perfed_tff.runtime.TFF_VERSION`). The training
program reaches it only through `perfed_tff.program.launch`
(`TrainingConfig(runtime='accelerated')`, the binaries' default);
docs/performance.md has what each part buys.
"""

import importlib

from perfed_tff import runtime as _runtime  # The TFF version check.

TFF_VERSION = _runtime.TFF_VERSION

_LAZY = {
    'AcceleratedContext': ('perfed_tff.accelerator.context',
                           'AcceleratedContext'),
}
__all__ = sorted(_LAZY) + ['TFF_VERSION']


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
