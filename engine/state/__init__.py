"""What a run keeps on disk to stop and resume: checkpoints, the run folder and its lock, RNG state, and the
checks that a resume is the same run."""
