"""Evaluation: answer grading (math_grading)."""
