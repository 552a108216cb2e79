"""The user-error type every module raises and every script prints as one line."""


class UserError(Exception):
  """A mistake in the user's input (flag, file, folder): the message says
  which and what to do; scripts print it as one line and exit with status 2."""
