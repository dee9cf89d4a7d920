"""Runs one trial (or the baseline step) end to end, in-process or as `python -m qtune.runner`."""
