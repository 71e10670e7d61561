"""`AcceleratedContext`: the owned runtime's execution context with the
accelerator's compiler and executors.

The same workers, supervision and errors as
`perfed_tff.runtime.ExecutionContext`; besides:

* each computation is compiled once per run, looked up by identity (TFF
  hashes its whole proto at every call), and across runs by its proto's
  digest (`computation_keeping.CompilerPipeline`, `compiled_cache`);
* each compiled computation is created on the worker once and only called
  again (`computation_keeping.ComputationKeepingExecutor`);
* Grappler runs where it pays (`compilation`: in the worker for
  convolutional models on a CPU worker started here, TFF's static pass
  otherwise);
* with one worker, computations can be built from the compiled ones
  (`compile`, `add_compiled`): several rounds per invocation
  (`multi_round`) and a round as one TensorFlow computation
  (`fused_round`).

The weights and metrics are TFF's, bit for bit (tests/test_ring_parity.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

from tensorflow_federated.python.core.impl.computation import computation_impl

from perfed_tff.accelerator import compilation
from perfed_tff.accelerator import computation_keeping
from perfed_tff.runtime import execution


class AcceleratedContext(execution.ExecutionContext):
  """`perfed_tff.runtime.ExecutionContext` with the accelerator.

  Args:
    workers, **kwargs: those of `ExecutionContext`.
    graph_optimization: where Grappler optimizes the TensorFlow graphs
      (`compilation`): 'runtime' (in the worker, after placement; fastest
      for convolutional models on CPU), 'tff' (TFF's static pass), or
      'auto' (for a locally started worker when TensorFlow sees no GPU:
      'runtime' for computations with convolutions, 'tff' for the rest;
      otherwise 'tff'). `self.graph_optimization` is the resolved setting.
  """

  def __init__(self, workers: Optional[Sequence[str]] = None, *,
               graph_optimization: str = 'auto', **kwargs):
    self._requested_optimization = compilation.check_graph_optimization(
        graph_optimization)
    self.graph_optimization = None
    self._pipelines: list[computation_keeping.CompilerPipeline] = []
    super().__init__(workers, **kwargs)

  def _compiler_fn(self):
    self.graph_optimization = compilation.resolve_graph_optimization(
        self._requested_optimization, local_worker=bool(self.local_workers))
    return compilation.compiler_fn(self.graph_optimization,
                                   local_worker=bool(self.local_workers))

  def _executor(self, stub):
    return computation_keeping.ComputationKeepingExecutor(stub)

  def _context_created(self, context) -> None:
    self._pipelines.append(
        computation_keeping.keep_compiled(context, self.graph_optimization))

  def compile(self, comp: computation_impl.ConcreteComputation
              ) -> computation_impl.ConcreteComputation:
    """`comp` in the form this context sends its worker (compiled once and
    kept; a single-worker context only)."""
    return self._single_pipeline().compile(comp)

  def add_compiled(self, comp: computation_impl.ConcreteComputation) -> None:
    """Runs `comp`, built from computations of `compile`, as it is."""
    self._single_pipeline().add_compiled(comp)

  def _single_pipeline(self) -> computation_keeping.CompilerPipeline:
    if not self.single_worker:
      raise ValueError('a multi-worker context compiles per invocation')
    return self._pipelines[0]


def current() -> Optional[AcceleratedContext]:
  """The innermost open `ExecutionContext` if it is an `AcceleratedContext`
  (None otherwise)."""
  context = execution.current()
  return context if isinstance(context, AcceleratedContext) else None
