"""The run store: the run folder's layout (RunDir), its lock, atomic writes, checkpoints, resume and the one reader of a run's files."""
