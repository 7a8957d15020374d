"""Engines move batches between stages; none of them knows what a stage does."""
