"""The paper's comparison in miniature on CPU: teacher, student, SFT vs RL vs OPD (see README.md)."""
