"""Training building blocks used by `training/train.py`: EMA, atomic checkpoints, LR schedule, MFU."""
