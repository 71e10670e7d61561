"""perfed_tff: Personalized Federated Averaging on TensorFlow Federated.

`build_per_fedavg` returns a `tff.learning.templates.LearningProcess`; see
`perfed_tff.per_fedavg` and `perfed_tff.per_fedavg_client_work` for the math.
It runs in any TFF execution context: TFF's own default, or one of your
pipeline's. The package is three rings, each importing only inward:

* the library (this package's modules, `data/`, `models/`): TFF's public
  API only;
* `perfed_tff.program`: the resumable training program, public TFF only;
* the optional outer ring, for TFF 0.87 only: `perfed_tff.runtime` (an
  execution context whose workers this library owns and supervises) and
  `perfed_tff.accelerator` (the same numbers, faster).

Attributes are imported lazily, and importing has no side effects.
"""

import importlib

__version__ = '0.3.0'

_LAZY = {
    'build_per_fedavg': ('perfed_tff.per_fedavg', 'build_per_fedavg'),
    'build_fed_avg': ('perfed_tff.fed_avg', 'build_fed_avg'),
    'build_algorithm': ('perfed_tff.algorithms', 'build_algorithm'),
    'Variant': ('perfed_tff.per_fedavg_step', 'Variant'),
    'build_personalized_evaluation': ('perfed_tff.personalization_eval',
                                      'build_personalized_evaluation'),
    'PersonalizedEvaluation': ('perfed_tff.personalization_eval',
                               'PersonalizedEvaluation'),
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
