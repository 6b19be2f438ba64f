"""`make listen`: a small server for one report folder that records blind A/B choices.

Each choice is POSTed to /choices and appended to `<report_dir>/choices.json`; opened as a file instead, the page
keeps choices in the browser's localStorage and a button downloads them as choices.json. Records: {"prompt",
"prompt_text", "pair": [A id, B id], "choice": "A"|"B"|"same", "preferred_model": id or null, "note", "time"}; a
later record for the same prompt and models replaces an earlier one in the summary.
"""

import errno
import functools
import json
import os
import re
import threading
import typing as tp
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from ..files import write_text_atomically
from .page import CHOICES, MAX_NOTE_CHARS, PAGE

CHOICES_FILE = "choices.json"
MAX_CHOICE_BYTES = 64 * 1024


class ReportFolderError(UserError, FileNotFoundError):
    """REPORT= is not a report folder, or the port cannot be used."""


def _read_choices(path: Path) -> tp.List[dict]:
    if not path.exists():
        return []
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON list; fix it or move it away to start a new one.")
    return records


def checked_choice(entry: tp.Any) -> dict:
    """A POSTed choice as it is stored; ValueError says what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError("a choice is a JSON object")
    pair, choice = entry.get("pair"), entry.get("choice")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(model, str) for model in pair)):
        raise ValueError(f"pair={pair!r}: give the two model ids in A, B order")
    if choice not in CHOICES:
        raise ValueError(f"choice={choice!r}: use one of {', '.join(CHOICES)}")
    note = entry.get("note") or ""
    if not isinstance(note, str):
        raise ValueError(f"note={note!r}: give text")
    return {
        "prompt": entry.get("prompt"),
        "prompt_text": entry.get("prompt_text"),
        "pair": pair,
        "choice": choice,
        "preferred_model": {"A": pair[0], "B": pair[1]}.get(choice),  # from the choice, whatever was sent
        "note": note[:MAX_NOTE_CHARS],
        "time": str(entry.get("time") or datetime.now(timezone.utc).isoformat(timespec="seconds")),
    }


class ReportServer(ThreadingHTTPServer):
    """Serves one report folder; `choices_lock` makes the appends to choices.json one at a time."""

    def __init__(self, report_dir: Path, address: tp.Tuple[str, int], quiet: bool = False):
        self.report_dir = Path(report_dir).resolve()
        self.choices_path = self.report_dir / CHOICES_FILE
        self.choices_lock = threading.Lock()
        self.quiet = quiet
        super().__init__(address, functools.partial(ReportHandler, directory=str(self.report_dir)))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class ReportHandler(SimpleHTTPRequestHandler):
    """The report folder's files (with byte ranges, so players can seek), GET /choices.json, POST /choices."""

    server: ReportServer
    _range_left: tp.Optional[int] = None

    def log_message(self, format: str, *args: tp.Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, value: tp.Any) -> None:
        body = json.dumps(value, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/" + CHOICES_FILE:
            return super().do_GET()
        try:
            with self.server.choices_lock:
                records = _read_choices(self.server.choices_path)
        except ValueError as error:
            return self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        self._send_json(HTTPStatus.OK, records)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/choices":
            return self._send_json(HTTPStatus.NOT_FOUND, {"error": "POST choices to /choices"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_CHOICE_BYTES:
            return self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"a choice is 1 to {MAX_CHOICE_BYTES} bytes"})
        try:
            entry = checked_choice(json.loads(self.rfile.read(length)))
        except ValueError as error:  # json.JSONDecodeError included
            return self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        try:
            with self.server.choices_lock:
                records = _read_choices(self.server.choices_path) + [entry]
                write_text_atomically(
                    self.server.choices_path, json.dumps(records, indent=1, ensure_ascii=False) + "\n"
                )
        except (ValueError, OSError) as error:
            return self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        self._send_json(HTTPStatus.OK, {"saved": len(records)})

    def send_head(self):
        """As the base class, plus one `Range: bytes=start-end` per request (206 Partial Content)."""
        self._range_left = None
        match = RANGE.fullmatch(self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path) or match.groups() == ("", ""):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        start = int(first) if first else max(0, size - int(last))
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size or start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        file = open(path, "rb")
        file.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._range_left = end - start + 1
        return file

    def copyfile(self, source, outputfile) -> None:
        try:
            if self._range_left is None:
                return super().copyfile(source, outputfile)
            while self._range_left > 0:
                chunk = source.read(min(64 * 1024, self._range_left))
                if not chunk:
                    break
                outputfile.write(chunk)
                self._range_left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser stopped reading (a player had the metadata it wanted): not an error


def make_server(report_dir: Path, port: int = 8000, host: str = "127.0.0.1", quiet: bool = False) -> ReportServer:
    """A server for `report_dir`, not yet serving (call serve_forever); port 0 picks a free port."""
    report_dir = Path(report_dir)
    if not (report_dir / PAGE).is_file():
        raise ReportFolderError(
            f"REPORT={report_dir}: {report_dir / PAGE} does not exist. Give a folder written by "
            "`make eval` (output/reports/<name>, or output/demo/report)."
        )
    try:
        return ReportServer(report_dir, (host, port), quiet=quiet)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ReportFolderError(
                f"PORT={port}: port {port} on {host} is in use; choose another "
                f"(make listen REPORT={report_dir} PORT={port + 1})."
            ) from error
        raise


def serve(report_dir: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve the report until interrupted; blind A/B choices go to `<report_dir>/choices.json`."""
    server = make_server(report_dir, port, host)
    print(f"Report at {server.url} (choices go to {server.choices_path}); Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
