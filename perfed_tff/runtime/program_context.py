"""The project's execution context as an async `tff.program.FederatedContext`.

TFF's program-level loops (`tff.learning.programs.train_model`,
`tff.program` release and state managers) run in a
`tff.program.NativeFederatedContext`, which invokes computations on an
*async* execution context from inside an event loop. `ProgramContext` enters
the project's `perfed_tff.runtime.ExecutionContext` (its owned C++ worker, or
remote workers) that way:

    with perfed_tff.runtime.program_context.ProgramContext() as ctx:
      asyncio.run(tff.learning.programs.train_model(
          train_process=process, ..., program_state_manager=checkpoints, ...))

`RoundDataSource` serves a `perfed_tff.data.task.FederatedTask` to it (the
clients and batches of round r are a pure function of (seed, r)). The
project's `perfed_tff.program.checkpointing.CheckpointManager` stores
train_model's program state (which holds a data iterator and an optional
timestamp) itself, through `flatten_train_model_state` and
`restore_train_model_state`; `TrainModelStateManager` does the same for any
other `ProgramStateManager` that stores arrays.

Every computation runs on the same worker and with the same compilation as
under `ExecutionContext`; the synchronous context is driven from a worker
thread (`asyncio.to_thread`), so one or several workers (TFF's mergeable
context) both work. Closing restores the context that was installed before.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from perfed_tff import checks
from perfed_tff.runtime import execution


class _SyncAsAsyncContext:
  """An async execution context (`invoke` is a coroutine) over a synchronous
  one: what `tff.program.NativeFederatedContext` calls."""

  def __init__(self, sync_context):
    self._sync_context = sync_context

  async def invoke(self, comp, arg):
    return await asyncio.to_thread(self._sync_context.invoke, comp, arg)


class ProgramContext:
  """Installs a `tff.program.NativeFederatedContext` over the project's
  execution context.

  Args:
    execution_context: an open `perfed_tff.runtime.ExecutionContext` to run
      on (it stays open on `close`); `None` opens one with
      `**execution_kwargs` (workers, max_concurrent_computation_calls, ...)
      and closes it, stopping its local worker, on `close`.
    **execution_kwargs: arguments of `ExecutionContext` when it is opened here.

  Attributes:
    federated_context: the installed `tff.program.NativeFederatedContext`.
    execution_context: the `ExecutionContext` underneath.
  """

  def __init__(self, execution_context: Optional[
      execution.ExecutionContext] = None, **execution_kwargs):
    self._previous = context_stack_impl.context_stack.current
    self._owned = execution_context is None
    if execution_context is None:
      execution_context = execution.ExecutionContext(**execution_kwargs)
    elif execution_kwargs:
      raise TypeError('pass either an ExecutionContext or its arguments, not '
                      f'both (got {sorted(execution_kwargs)}).')
    if execution_context.context is None:
      raise ValueError('the ExecutionContext is closed.')
    self.execution_context = execution_context
    self.federated_context = tff.program.NativeFederatedContext(
        _SyncAsAsyncContext(execution_context.context))
    tff.framework.set_default_context(self.federated_context)
    self._open = True

  def close(self) -> None:
    """Reinstalls the previous context; stops the workers started here."""
    if not self._open:
      return
    self._open = False
    if context_stack_impl.context_stack.current is self.federated_context:
      context_stack_impl.context_stack.set_default_context(self._previous)
    if self._owned:
      self.execution_context.close()
      # Closing reinstalls an enclosing context or an error context; the
      # one current before this ProgramContext wins.
      context_stack_impl.context_stack.set_default_context(self._previous)

  def __enter__(self) -> 'ProgramContext':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ---------------------------------------------------------------------------
# What `tff.learning.programs.train_model` needs besides the context.


class RoundDataIterator(tff.program.FederatedDataSourceIterator):
  """Round r's clients and batches, a pure function of (seed, r)
  (`perfed_tff.data.task.round_client_data`, as the project's training
  program samples them); its whole state is the next round number."""

  def __init__(self, source: 'RoundDataSource', round_num: int = 1):
    self._source = source
    self.round_num = int(round_num)

  @property
  def federated_type(self) -> tff.FederatedType:
    return self._source.federated_type

  def select(self, k: Optional[int] = None):
    """The datasets of `k` clients sampled for the next round."""
    from perfed_tff.data import task as task_lib  # pylint: disable=g-import-not-at-top
    source = self._source
    _, datasets = task_lib.round_client_data(
        source.task, clients_per_round=k or source.clients_per_round,
        num_batches=source.num_batches, batch_size=source.batch_size,
        seed=source.seed, round_num=self.round_num)
    self.round_num += 1
    return datasets

  def to_bytes(self) -> bytes:
    return np.int64(self.round_num).tobytes()

  def __deepcopy__(self, memo) -> 'RoundDataIterator':
    # train_model copies iterators; the source (task data) is shared.
    return RoundDataIterator(self._source, self.round_num)

  @classmethod
  def from_bytes(cls, buffer: bytes) -> 'RoundDataIterator':
    raise NotImplementedError('use RoundDataSource.iterator_from_bytes')

  def __eq__(self, other) -> bool:
    return (isinstance(other, RoundDataIterator)
            and other.round_num == self.round_num
            and other._source is self._source)  # pylint: disable=protected-access


class RoundDataSource(tff.program.FederatedDataSource):
  """A `tff.program.FederatedDataSource` over a
  `perfed_tff.data.task.FederatedTask`: every round, `clients_per_round`
  clients, each with `num_batches` batches of `batch_size` of its shuffled
  train data (use `perfed_tff.algorithms.batches_per_round`)."""

  def __init__(self, task, *, clients_per_round: int, num_batches: int,
               batch_size: int, seed: int = 0):
    self.task = task
    self.clients_per_round = checks.integer('clients_per_round',
                                            clients_per_round, 1)
    self.num_batches = checks.integer('num_batches', num_batches, 1)
    self.batch_size = checks.integer('batch_size', batch_size, 1)
    self.seed = seed
    self._federated_type = tff.FederatedType(
        tff.SequenceType(tff.types.tensorflow_to_type(task.element_spec)),
        tff.CLIENTS)

  @property
  def federated_type(self) -> tff.FederatedType:
    return self._federated_type

  def iterator(self) -> RoundDataIterator:
    return RoundDataIterator(self)

  def iterator_from_bytes(self, buffer: bytes) -> RoundDataIterator:
    return RoundDataIterator(self, int(np.frombuffer(buffer, np.int64)[0]))


def is_train_model_state(value) -> bool:
  """Whether `value` is the program state `tff.learning.programs.train_model`
  saves (`tff.learning.programs.ProgramState`)."""
  return isinstance(value, tff.learning.programs.ProgramState)


def flatten_train_model_state(program_state) -> list:
  """train_model's `ProgramState(state, round_number,
  next_evaluation_timestamp_seconds, data_iterator)` as arrays:
  `[state, round_number, timestamp or -1, iterator bytes as uint8]` (no
  iterator: no bytes)."""
  state, round_number, timestamp, iterator = program_state
  raw = b'' if iterator is None else iterator.to_bytes()
  return [state, np.int64(round_number),
          np.float64(-1.0 if timestamp is None else timestamp),
          np.frombuffer(raw, np.uint8).copy()]


def restore_train_model_state(flat, structure,
                              source: Optional[RoundDataSource] = None):
  """The `ProgramState` shaped like `structure` of its
  `flatten_train_model_state` arrays `flat`.

  The data iterator is rebuilt by `source.iterator_from_bytes`, else (a
  `RoundDataIterator` in `structure`) by its own source, else by its class's
  `from_bytes`.
  """
  state, round_number, timestamp, raw = flat
  template = structure[3]
  buffer = np.asarray(raw, np.uint8).tobytes()
  if template is None:
    iterator = None
  elif source is not None:
    iterator = source.iterator_from_bytes(buffer)
  elif isinstance(template, RoundDataIterator):
    iterator = template._source.iterator_from_bytes(buffer)  # pylint: disable=protected-access
  else:
    iterator = type(template).from_bytes(buffer)
  timestamp = float(timestamp)
  return type(structure)(state, int(round_number),
                         None if timestamp < 0 else timestamp, iterator)


class TrainModelStateManager(tff.program.ProgramStateManager):
  """Lets any `ProgramStateManager` that stores arrays hold the program state
  of `tff.learning.programs.train_model`.

  train_model saves `ProgramState(state, round_number,
  next_evaluation_timestamp_seconds (may be None), data_iterator)`; this
  stores `flatten_train_model_state` of it through `manager` and rebuilds the
  `ProgramState` on load (`restore_train_model_state`). The project's
  `perfed_tff.program.checkpointing.CheckpointManager` does this itself, so
  it needs no wrapper (wrapped, it works the same).
  """

  def __init__(self, manager: tff.program.ProgramStateManager,
               source: Optional[RoundDataSource] = None):
    super().__init__()
    self._manager = manager
    self._source = source

  async def get_versions(self):
    return await self._manager.get_versions()

  async def save(self, program_state, version: int) -> None:
    await self._manager.save(flatten_train_model_state(program_state),
                             version)

  async def load(self, version: int, structure):
    flat = await self._manager.load(version,
                                    flatten_train_model_state(structure))
    return restore_train_model_state(flat, structure, self._source)
