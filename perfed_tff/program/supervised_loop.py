"""The process and the checkpoint manager as the training program hands them
to TFF's loop (`tff.simulation.run_training_process`,
`perfed_tff.program.training_loop`): every round (or block of rounds,
`perfed_tff.accelerator.round_blocks`) a phase of the run's supervisor
(`launch.supervisor`) whose metrics pass the divergence check before the
loop releases or checkpoints them, and every checkpoint write a phase that
an interrupt cannot cut short."""

from __future__ import annotations

import time
from typing import Optional

import tensorflow_federated as tff

from perfed_tff.program import checkpointing
from perfed_tff.program import divergence
from perfed_tff.program import metrics as metrics_lib


class SupervisedProcess:
  """`process` as this program runs it in TFF's loop: `initialize()` returns
  the state the program already computed (TFF's loop calls it again only for
  the state's structure), and each `next` is a watched round whose metrics
  pass the divergence check before TFF's loop releases or checkpoints them.
  With `blocks` (the accelerator's `RoundBlocks`), `next` takes the round
  number and a block of rounds is one watched phase."""

  def __init__(self, process, initial_state, supervisor,
               check: divergence.DivergenceCheck, blocks=None):
    self._process = process
    self._initial_state = initial_state
    self._supervisor = supervisor
    self._check = check
    self._blocks = blocks
    self.round_num = 0
    self.last_metrics = None

  def initialize(self):
    return self._initial_state

  def begin_round(self, round_num: int) -> None:
    self._supervisor.check_stop()
    self.round_num = round_num
    if self._blocks is None:
      self._supervisor.begin(f'round {round_num}', 'round')
    elif not self._blocks.pending(round_num):
      rounds = self._blocks.rounds_from(round_num)
      self._supervisor.begin(
          f'round {round_num}' if rounds == 1 else
          f'rounds {round_num}-{round_num + rounds - 1}', 'round', rounds)

  def next(self, state, data):
    start = time.time()
    if self._blocks is None:
      output = self._process.next(state, data)
      self._supervisor.end()
    elif self._blocks.pending(self.round_num):
      output = self._blocks.next(state, self.round_num)
    else:
      output = self._blocks.next(state, self.round_num)
      self._supervisor.end()
    self.last_metrics = output.metrics
    try:
      self._check.check(output.metrics, self.round_num)
    except divergence.NonFiniteLossError:
      output.metrics[metrics_lib.ROUND_SECONDS] = (
          self._round_seconds() or time.time() - start)
      raise
    return output

  def _round_seconds(self) -> Optional[float]:
    """The current round's share of its block's time (None: the round was
    its own invocation)."""
    return (None if self._blocks is None
            else self._blocks.seconds(self.round_num))


class SupervisedCheckpoints(tff.program.ProgramStateManager):
  """The run's `CheckpointManager`, each save a supervised phase that an
  interrupt cannot cut short (a checkpoint is written whole). With
  `preloaded` (state, version), TFF's loop is handed the state this program
  already loaded and checked instead of loading it again."""

  def __init__(self, manager: checkpointing.CheckpointManager,
               supervisor, preloaded=None):
    self._manager = manager
    self._supervisor = supervisor
    self._preloaded = preloaded

  async def get_versions(self):
    return await self._manager.get_versions()

  async def load(self, version, structure):
    return await self._manager.load(version, structure)

  async def load_latest(self, structure):
    if self._preloaded is not None:
      return self._preloaded
    return await self._manager.load_latest(structure)

  async def save(self, program_state, version):
    with self._supervisor.saving(f'checkpoint {version}'):
      await self._manager.save(program_state, version)
