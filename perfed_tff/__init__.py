"""perfed_tff: Personalized Federated Averaging on TensorFlow Federated.

`build_per_fedavg` returns a `tff.learning.templates.LearningProcess`; see
`perfed_tff.process` and `perfed_tff.client_work` for the math.
"""

from perfed_tff.client_work import Variant
from perfed_tff.execution import ExecutionContext
from perfed_tff.process import build_per_fedavg

__all__ = ['build_per_fedavg', 'ExecutionContext', 'Variant']
__version__ = '0.1.0'
