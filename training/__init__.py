"""What the training stages share: the trainer outline, LR and phase schedules, checkpoints, the Ray
Train runner, config records and the run-folder layout. Below `sae/` and `distill/`, above `corpus/`."""
