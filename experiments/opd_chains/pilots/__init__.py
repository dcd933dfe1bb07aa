"""Pilot runs that chose the task difficulty and model sizes (before the predictions)."""
