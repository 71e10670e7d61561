"""The resumable training program: `config` (TrainingConfig and its
validation), `training_loop` (TFF's loop with checkpoints, metrics and
evaluation), `checkpointing` (a `tff.program.ProgramStateManager`), `metrics`
(release managers) and `population_eval` (evaluation of a run's populations)."""
