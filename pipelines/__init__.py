"""Beam pipelines; `python -m pipelines.extract` is the front door."""
