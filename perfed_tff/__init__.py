"""perfed_tff: Personalized Federated Averaging on TensorFlow Federated.

`build_per_fedavg` returns a `tff.learning.templates.LearningProcess`; see
`perfed_tff.process` and `perfed_tff.client_work` for the math. Attributes are
imported lazily so that tools which never touch TensorFlow (flag validation,
`python -m perfed_tff.worker`) start without its import cost.
"""

import importlib

__version__ = '0.1.0'

_LAZY = {
    'build_per_fedavg': ('perfed_tff.process', 'build_per_fedavg'),
    'ExecutionContext': ('perfed_tff.execution', 'ExecutionContext'),
    'Variant': ('perfed_tff.client_work', 'Variant'),
    'build_personalized_evaluation': ('perfed_tff.evaluation',
                                      'build_personalized_evaluation'),
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
