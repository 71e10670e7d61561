"""perfed_tff: Personalized Federated Averaging on TensorFlow Federated.

`build_per_fedavg` returns a `tff.learning.templates.LearningProcess`; see
`perfed_tff.per_fedavg` and `perfed_tff.per_fedavg_client_work` for the math.
Attributes are imported lazily, and importing has no side effects: TFF's
default context is untouched until you open `perfed_tff.ExecutionContext()`.
"""

import importlib

__version__ = '0.2.0'

_LAZY = {
    'build_per_fedavg': ('perfed_tff.per_fedavg', 'build_per_fedavg'),
    'build_algorithm': ('perfed_tff.algorithms', 'build_algorithm'),
    'Variant': ('perfed_tff.per_fedavg_client_work', 'Variant'),
    'build_personalized_evaluation': ('perfed_tff.personalization_eval',
                                      'build_personalized_evaluation'),
    'ExecutionContext': ('perfed_tff.runtime.execution', 'ExecutionContext'),
    'ProgramContext': ('perfed_tff.runtime.program_context', 'ProgramContext'),
    'RoundDataSource': ('perfed_tff.runtime.program_context',
                        'RoundDataSource'),
    'TrainModelStateManager': ('perfed_tff.runtime.program_context',
                               'TrainModelStateManager'),
    'export': ('perfed_tff.export', None),
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
      value = getattr(value, attr)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
