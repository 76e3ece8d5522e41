"""The config schema: every key with its default, valid values, meaning and whether a resume
may change it (keys.py), and what uses it (schema.py)."""
