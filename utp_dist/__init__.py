"""utp_dist: one training loop for Hugging Face image classifiers, from a laptop CPU to Slurm arrays."""

__version__ = "0.2.0"
