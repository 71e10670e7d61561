"""Several rounds of a learning process in one TFF invocation.

A training round is one invocation of `process.next`: the context serializes
the state and the clients' inputs, the worker runs the round, the result
comes back. Under the owned single-worker context
(`perfed_tff.runtime.ExecutionContext`) a round of the digits MLP costs
about 35 ms, a third of it paid per invocation in this process
(docs/performance.md). `build_multi_round_next(context, next_fn, rounds)`
returns a computation that runs `rounds` rounds in one invocation:

    (state, <data_1, ..., data_K>) -> (state after round K,
                                       [metrics_1, ..., metrics_K])

Its body calls `next_fn` K times in sequence, each on the state the previous
call returned and on its own round's client data, exactly as K invocations
of `next_fn` would (same computation, same inputs, same order: the weights
and metrics are bit-identical; `tests/test_runtime_multi_round.py`).

It is built from `next_fn` *as the context compiled it* (TFF's native form,
once per run), bound once in a block and called K times, so neither the
compilation nor the computation sent to the worker grows with K; the
context runs the result as it is (`ExecutionContext.add_compiled`).
`next_fn` may also be a round fused into one TensorFlow computation
(`perfed_tff.accelerator.fused_round`), which the training program's blocks use
where they can. A multi-worker context splits every round's clients across workers and merges
their partial aggregates in this process, between rounds, so it runs one
round per invocation.
"""

from __future__ import annotations

from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.types import computation_types

from perfed_tff import checks


def build_multi_round_next(context, next_fn: computation_impl.ConcreteComputation,
                           rounds: int) -> computation_impl.ConcreteComputation:
  """`rounds` calls of `next_fn` (a `(state, client data) -> (state,
  metrics)` computation, e.g. a `LearningProcess`'s `next`) in sequence, as
  one computation of `(state, <client data of each round>)` returning
  `(state, [metrics of each round])`, with `next_fn`'s Python containers.

  Args:
    context: the single-worker `perfed_tff.runtime.ExecutionContext` that
      will run it (it compiles `next_fn` and runs the result as it is).
    next_fn: the round computation.
    rounds: K >= 1.
  """
  checks.integer('rounds', rounds, 1)
  signature = next_fn.type_signature
  state_type, data_type = signature.parameter
  result_type = signature.result
  compiled = context.compile(next_fn).to_building_block()

  parameter_type = computation_types.StructType(
      [('state', state_type),
       ('data', computation_types.StructType([data_type] * rounds))])
  parameter = building_blocks.Reference('multi_round_arg', parameter_type)
  next_ref = building_blocks.Reference('round_next', compiled.type_signature)
  data = building_blocks.Selection(parameter, index=1)
  state = building_blocks.Selection(parameter, index=0)
  bindings = [('round_next', compiled)]
  metrics = []
  for k in range(rounds):
    name = f'round_{k + 1}'
    bindings.append((name, building_blocks.Call(
        next_ref, building_blocks.Struct(
            [state, building_blocks.Selection(data, index=k)]))))
    output = building_blocks.Reference(name, compiled.type_signature.result)
    state = building_blocks.Selection(output, index=0)
    metrics.append(building_blocks.Selection(output, index=1))
  body = building_blocks.Block(
      bindings, building_blocks.Struct([state, building_blocks.Struct(metrics)]))
  function = building_blocks.Lambda('multi_round_arg', parameter_type, body)
  # The compiled form lost the Python containers; the annotated type gives
  # the state and the metrics back as `next_fn` returns them.
  annotated = computation_types.FunctionType(
      parameter_type,
      computation_types.StructWithPythonType(
          [result_type[0],
           computation_types.StructWithPythonType([result_type[1]] * rounds,
                                                  list)],
          tuple))
  multi_round = computation_impl.ConcreteComputation(
      computation_proto=function.proto,
      context_stack=context_stack_impl.context_stack,
      annotated_type=annotated)
  context.add_compiled(multi_round)
  return multi_round
