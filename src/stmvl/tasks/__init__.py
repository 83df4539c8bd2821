"""Tasks: what the one training engine (stmvl.train.engine.Trainer) runs. A task supplies the model, the batches,
the loss of a step and the evaluation; the engine does everything else (optimizer, precision, DDP, checkpoints)."""
