"""Temporal curricula (TCOD) and baselines."""
