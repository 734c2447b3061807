"""The error every source and transform raises for bad input data."""


class DataError(ValueError):
  """A record that cannot be read or fails validation.

  The message always starts with the file (or annotation) at fault, so that a
  crash in a worker process still tells the user what to fix.
  """
