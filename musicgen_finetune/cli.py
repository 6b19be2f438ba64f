"""What every command-line entry in tools/ shares: one `error:` line for anything a user can cause.

def main(argv=None) -> None: ...            # parse, then call the stage
if __name__ == "__main__":                   # a worker process that imports this file runs nothing
    cli.main(main)
"""

import sys
import typing as tp

from .errors import UserError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


def main(
    entry: tp.Callable[[tp.Optional[tp.Sequence[str]]], tp.Optional[int]], argv: tp.Optional[tp.Sequence[str]] = None
) -> tp.NoReturn:
    """Run `entry(argv)` and exit with its status: 2 and `error: <message>` for a UserError, 130 when
    interrupted (Ctrl-C), a traceback only for what is a bug."""
    try:
        status = entry(argv)
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
    sys.exit(status or 0)


def one_line(message: str) -> str:
    """A message on one line: line breaks become '; '."""
    return "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def number(text: str, variable: str, kind: type = float) -> tp.Any:
    """A number given on the command line, or a UserError naming the Makefile variable it came from."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{variable}={text}: must be {what}.") from None
