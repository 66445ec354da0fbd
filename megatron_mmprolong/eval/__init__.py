"""Evaluation of trained checkpoints (`mmprolong eval`)."""
