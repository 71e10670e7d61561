"""The training program's rounds, several per TFF invocation.

Round r's clients and their batches are a pure function of (seed, r)
(`task.sample_clients`, `task.derive_seed`), and the worker builds the
batches from the clients' examples and seeds; so the program can hand the
worker the inputs of rounds r..r+K-1 at once and run them in one invocation
(`perfed_tff.accelerator.multi_round`), with the same weights and per-round
metrics as K invocations. A block never runs past a round where the program
needs the state in Python: a checkpoint round, an evaluation round, the last
round. A run killed inside a block resumes from the checkpoint before it
and computes the same rounds again.

`rounds_per_invocation` (a `TrainingConfig` field, `--rounds_per_invocation`)
is K at most; 0 (the default) lets the program choose: up to the next
checkpoint or evaluation round, at most `AUTO_MAX_ROUNDS`, and at most
`MAX_BLOCK_BYTES` of client inputs in one invocation.

Each round of a block is one TensorFlow computation when it can be
(`perfed_tff.accelerator.fused_round`: the same numbers, about half the
worker's time per round on the digits MLP). Fusing costs about 0.15 s per
client, once, and saves 1-2 ms per client and round: a run of at least
`FUSE_MIN_ROUNDS` rounds fuses; a shorter one uses a fused round that an
earlier run kept in the computation cache, and runs federated otherwise.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff.accelerator import context as context_lib
from perfed_tff.accelerator import fused_round
from perfed_tff.accelerator import multi_round

# K under rounds_per_invocation=0: the gain per round levels off well before
# (docs/performance.md), and a block's client inputs are held at once.
AUTO_MAX_ROUNDS = 10
# Client inputs (examples and seeds) of one block, at most; a block always
# runs at least one round.
MAX_BLOCK_BYTES = 256 * 1024 * 1024
# A run this long fuses its rounds (digits MLP, 10 clients: 1.5-2.5 s to
# fuse, about 15 ms saved a round).
FUSE_MIN_ROUNDS = 100


def _next_multiple(round_num: int, every: int) -> int:
  return -(-round_num // every) * every


def last_round_of_block(round_num: int, *, total_rounds: int,
                        checkpoint_every: int, eval_every: int,
                        max_rounds: int) -> int:
  """The last round of the block that starts at `round_num`: at most
  `max_rounds` rounds, ending at the next checkpoint round, evaluation round
  (eval_every > 0) or `total_rounds`, whichever comes first."""
  ends = [total_rounds, round_num + max(1, max_rounds) - 1,
          _next_multiple(round_num, checkpoint_every)]
  if eval_every:
    ends.append(_next_multiple(round_num, eval_every))
  return min(ends)


def _nbytes(inputs) -> int:
  return sum(getattr(a, 'nbytes', 0) for a in tf.nest.flatten(inputs))


class RoundBlocks:
  """Runs the rounds of a worker-side process (one that takes
  `round_client_inputs`) in blocks.

  `next(state, round_num)` returns round `round_num`'s
  `LearningProcessOutput`. At the first round of a block it runs the whole
  block in one invocation and keeps the later rounds' metrics; their calls
  return them (the state is the block's last; the rounds inside a block
  never checkpoint or evaluate, so only the last round's state is handed
  on). `seconds(round_num)` is a block round's share of the block's time.

  Args:
    process: the worker-side `LearningProcess`.
    context: the single-worker `perfed_tff.accelerator.AcceleratedContext`
      it runs in.
    round_inputs: `round_num -> client inputs of that round`.
    last_round: `round_num -> last round of the block starting there`.
    max_bytes: client inputs of one block, at most.
    fuse: whether to fuse rounds (`fused_round`); if not, a fused round is
      used only if an earlier run kept one.
  """

  def __init__(self, process, context, *,
               round_inputs: Callable[[int], list],
               last_round: Callable[[int], int],
               max_bytes: int = MAX_BLOCK_BYTES, fuse: bool = True):
    self._process = process
    self._context = context
    self._round_inputs = round_inputs
    self._last_round = last_round
    self._max_bytes = max_bytes
    self._fuse = fuse
    self._rounds = {}                # clients per round -> round computation
    self._computations = {}          # (round computation, K) -> K of them
    self._ahead = {}                 # round -> metrics not handed out yet
    self._state = None               # the last block's final state
    self._seconds = {}               # round -> its share of its block's time

  def pending(self, round_num: int) -> bool:
    """Whether round `round_num` was run by an earlier block."""
    return round_num in self._ahead

  def rounds_from(self, round_num: int) -> int:
    """The rounds of the block that would start at `round_num`."""
    return self._last_round(round_num) - round_num + 1

  def seconds(self, round_num: int) -> Optional[float]:
    return self._seconds.pop(round_num, None)

  def _round(self, inputs: list):
    """The computation of rounds with `inputs`' clients: fused if it can
    be, else the process's `next`."""
    sizes = {len(data) for data in inputs}
    if len(sizes) != 1:
      return self._process.next
    num_clients = sizes.pop()
    if num_clients not in self._rounds:
      self._rounds[num_clients] = fused_round.build_fused_next(
          self._context, self._process.next, num_clients, build=self._fuse)
    return self._rounds[num_clients] or self._process.next

  def _computation(self, round_fn, rounds: int):
    comp = self._computations.get((round_fn, rounds))
    if comp is None:
      comp = multi_round.build_multi_round_next(self._context, round_fn,
                                                rounds)
      self._computations[(round_fn, rounds)] = comp
    return comp

  def next(self, state, round_num: int):
    if round_num in self._ahead:
      metrics = self._ahead.pop(round_num)
      # The block's state goes on with its last round (rounds come in order).
      state, self._state = ((None, self._state) if self._ahead
                            else (self._state, None))
      return tff.learning.templates.LearningProcessOutput(state=state,
                                                          metrics=metrics)
    self._ahead.clear()
    start = time.time()
    inputs = [self._round_inputs(round_num)]
    size = _nbytes(inputs[0])
    for r in range(round_num + 1, self._last_round(round_num) + 1):
      data = self._round_inputs(r)
      size += _nbytes(data)
      if size > self._max_bytes:
        break
      inputs.append(data)
    round_fn = self._round(inputs)
    if len(inputs) == 1:
      output = round_fn(state, inputs[0])
      self._seconds[round_num] = time.time() - start
      return output
    final_state, metrics = self._computation(round_fn, len(inputs))(
        state, inputs)
    share = (time.time() - start) / len(inputs)
    for k, round_metrics in enumerate(metrics):
      self._seconds[round_num + k] = share
      if k:
        self._ahead[round_num + k] = round_metrics
    self._state = final_state
    return tff.learning.templates.LearningProcessOutput(
        state=None, metrics=metrics[0])


def for_run(config, process, on_worker, *,
            round_inputs: Callable[[int], list]) -> Optional[RoundBlocks]:
  """The `RoundBlocks` of a training run of `config` (a `TrainingConfig`),
  or None: one round per invocation (`rounds_per_invocation=1`, a process
  that takes datasets (`on_worker is process`), or a current context that
  is not one single-worker `ExecutionContext`)."""
  context = context_lib.current()
  if (config.rounds_per_invocation == 1 or on_worker is process
      or context is None or not context.is_current()
      or not context.single_worker):
    return None
  max_rounds = config.rounds_per_invocation or AUTO_MAX_ROUNDS
  return RoundBlocks(
      on_worker, context, round_inputs=round_inputs,
      last_round=lambda r: last_round_of_block(
          r, total_rounds=config.rounds,
          checkpoint_every=config.checkpoint_every,
          eval_every=config.eval_every, max_rounds=max_rounds),
      fuse=config.rounds >= FUSE_MIN_ROUNDS)
