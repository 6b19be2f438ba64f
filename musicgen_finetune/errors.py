"""The one error base class of the harness.

A `UserError` is something the person running a command can fix: a wrong path, a bad value, a model folder that
lacks a file, a checkpoint that would need arbitrary code to unpickle. Its message names the file or value and
the fix, in one sentence or a few, on one line. Every tool catches it (`cli.main`) and prints `error: <message>`
with exit status 2, never a traceback. Anything else is a bug and keeps its traceback.

Each stage has its own subclasses (`DatasetError`, `ModelDirError`, `ExportError`, ...), which keep their other
bases (ValueError, FileNotFoundError) so that callers catching those still work.
"""


class UserError(Exception):
    """Something to fix before the command can succeed; the message says what and how."""
