"""What a training script does when it is asked to stop: SIGTERM (a scheduler preempting, requeueing
or cancelling its job; ``kill``) or SIGUSR1 (the grid's Slurm jobs get it ``--signal=USR1@<s>``
ahead of their time limit). The run finishes the optimizer step it is in, saves a checkpoint there
(weights, optimizer, scheduler, RNG and data position: the Trainer's own), and exits with code
``EXIT_INTERRUPTED`` (75) without evaluating. The same command resumes from that checkpoint and
ends with the result an uninterrupted run gets (``tests/test_slurm.py`` requeues a running
transfer on a real Slurm and compares its predictions with an uninterrupted run's).

Resuming mid-epoch is exact because of ``MidEpochResumeMixin``: the Trainer restores the RNG a
checkpoint saved only after it has drawn the resumed epoch's shuffled order (from the RNG as it
happens to be), so the order would differ from the uninterrupted run's; the mixin saves the RNG
state each epoch began with beside every checkpoint and puts it back before that draw.

Under ``accelerate launch`` every process decides at the same step: the flag is all-reduced after
each step, so no rank waits in a collective for one that stopped."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .errors import Interrupted

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EPOCH_RNG_FILE = "epoch_rng_state{rank}.safetensors"  # beside the Trainer's rng_state{rank}.pth


def _epoch_index(state) -> int:
    return math.floor((state.epoch or 0.0) + 1e-6)


class MidEpochResumeMixin:
    """A Trainer mixin: every checkpoint also holds the CPU RNG state its epoch began with (and that
    epoch's index), and a run resumed from a checkpoint in the middle of an epoch starts that epoch
    from it, so the epoch's shuffle (and the data loader's seed) is drawn as it was the first time."""

    _epoch_rng: Optional[tuple[int, torch.Tensor]] = None
    _resume_from: Optional[str] = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_from = resume_from_checkpoint
        if not any(isinstance(c, _EpochStart) for c in self.callback_handler.callbacks):
            self.add_callback(_EpochStart(self))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _epoch_rng_path(self, folder: str) -> str:
        return os.path.join(folder, EPOCH_RNG_FILE.format(rank=f"_{self.args.process_index}" if self.args.world_size > 1 else ""))

    def _save_checkpoint(self, model, trial):
        from safetensors.torch import save_file
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self._epoch_rng is not None:  # written before the Trainer's files: trainer_state.json, written last, marks the whole
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            epoch, rng = self._epoch_rng
            save_file({"cpu_rng_state": rng}, self._epoch_rng_path(folder), metadata={"epoch": str(epoch)})
        super()._save_checkpoint(model, trial)

    def _epoch_begins(self, state) -> None:
        from safetensors import safe_open

        resume, self._resume_from = self._resume_from, None  # only the first epoch of a resumed run
        epoch = _epoch_index(state)
        path = self._epoch_rng_path(resume) if resume else None
        if path and os.path.isfile(path):
            with safe_open(path, framework="pt") as f:
                if int(f.metadata()["epoch"]) == epoch:  # the checkpoint lies inside this epoch
                    torch.random.set_rng_state(f.get_tensor("cpu_rng_state"))
                    logger.info("resuming inside epoch %d: its shuffle is drawn from the RNG state it began with", epoch + 1)
        elif resume:
            logger.warning("%s has no %s: a run resumed inside an epoch may see that epoch's data in another order", resume, os.path.basename(path))
        self._epoch_rng = (epoch, torch.random.get_rng_state())


class _EpochStart(TrainerCallback):
    def __init__(self, trainer: MidEpochResumeMixin):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._epoch_begins(state)


class SaveAndStopOnSignal(TrainerCallback):
    """Catches ``STOP_SIGNALS`` while training (the previous handlers come back when training ends)
    and turns the first one into a checkpoint and a stop at the end of the current step."""

    def __init__(self):
        self.received: Optional[int] = None  # the signal this process caught
        self.stopped_at: Optional[int] = None  # the step training stopped at because of it (on every rank)
        self._previous: dict[int, object] = {}

    def _catch(self, signum, frame) -> None:
        self.received = self.received or signum  # only a flag: the training loop acts on it

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._catch) for s in STOP_SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the epoch was cut short: no epoch-end evaluation (it would compete for the best checkpoint) nor second save
            control.should_evaluate = False
            control.should_save = False

    def _agreed(self, args) -> bool:
        stop = self.received is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(int(stop), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


def train_until_stopped(trainer: Trainer, resume_from: Optional[str]):
    """``trainer.train`` (resuming from ``resume_from``) that saves and raises ``Interrupted`` when
    a stop signal arrives before its last step; otherwise its ``TrainOutput``. (A signal after the
    last step lets the run finish: a scheduler that must stop it kills it, and the same command
    then resumes from the final checkpoint.)"""
    stopper = SaveAndStopOnSignal()
    trainer.add_callback(stopper)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        trainer.remove_callback(stopper)
    if stopper.stopped_at is not None:
        cause = f"{signal.Signals(stopper.received).name} received" if stopper.received else "another process received a stop signal"
        raise Interrupted(f"{cause}: stopped at step {stopper.stopped_at} with a checkpoint in {trainer.args.output_dir}; "
                          "the same command resumes from it")
    return result
