"""Scores and tuning on labelled images: evaluate, the scipy tuner, folds."""
