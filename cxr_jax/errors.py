"""Errors a user can fix from the message alone: every command prints them as one line and
exits with status 2 (the traceback behind --traceback). No imports: every layer raises them."""


class UserError(ValueError):
  """Something the user gave (a flag, a config value, a file, a directory) is wrong; the
  message says what, where and what to do."""


class ConfigError(UserError):
  """A config value or flag that cannot work (or cannot resume the run in the directory)."""
