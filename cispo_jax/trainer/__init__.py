"""The RL loop (loop.py: Trainer.step is the data flow) and its run config (config.py: RLConfig holding one
section per stage). The sections are re-exported here so a script builds a run from one import."""

from cispo_jax.trainer.config import (SECTIONS, CheckpointConfig, EvalConfig, ModelRunConfig, RLConfig,
                                      RolloutConfig, UpdateConfig)
from cispo_jax.trainer.loop import EXIT_PREEMPTED, Trainer, run_loss_config
from cispo_jax.trainer.signals import NonFiniteTraining
