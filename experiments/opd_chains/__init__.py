"""The OPD claims miniature on chains (see README.md)."""
