"""Which files a request may read: only those the cog runtime wrote for it.

coglet 0.23.1 downloads an input that starts with ``http://``, ``https://`` or ``data:`` into
``NamedTemporaryFile(suffix=<name>)`` in the system's temporary folder and hands ``run()`` a
``cog.Path``; any other string (``"/dev/zero"``, ``"/etc/passwd"``, ``""``,
``"file:///..."``) reaches ``run()`` as that string, and a list mixing URLs and other strings
is not downloaded at all. A file input is accepted only when it is a path object naming a
regular file (not a link, device, pipe or folder) that the runtime created for this request:
directly inside the folder it downloads into (``$DA3COG_INPUT_DIR``, default the system's
temporary folder), under the runtime's temporary-file name pattern, created after the
previous request finished, and no larger than ``max_input_bytes``. Everything else is refused,
named as the user gave it, before it is opened.

The runtime deletes a request's downloads when ``run()`` returns, but not those of a request
whose download failed (a 0-byte file, and any list siblings already fetched): when a request
ends, files of the runtime's name pattern created in the download folder since the previous
request ended are removed too (one request at a time per worker, so they are this worker's).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from da3cog.serve.limits import DEFAULT_LIMITS
from da3cog.serve.request import RequestError, RequestValues

INPUT_DIR_ENV = "DA3COG_INPUT_DIR"
# Python's NamedTemporaryFile names: "tmp" + 8 characters + the suffix cog gives (the name).
RUNTIME_NAME = re.compile(r"^tmp[a-z0-9_]{8}")
# File-system time stamps may trail the wall clock by a tick.
CLOCK_SLACK_SECONDS = 1.0


def request_files(values: RequestValues) -> Iterator[tuple[str, object]]:
    """``(input name, value)`` of every file input of a request, as ``run()`` received it."""
    yield "image", values.image
    for index, extra in enumerate(values.images):
        yield f"images[{index}]", extra
    if values.cameras is not None:
        yield "cameras", values.cameras


@dataclass
class RequestFiles:
    """The provenance rule (see the module docstring).

    Attributes:
        root: the folder the runtime writes inputs into.
        max_input_bytes: one input file's size.
        since: files created before this time (``time.time()``) belong to earlier requests.
    """

    root: Path
    max_input_bytes: int = DEFAULT_LIMITS.max_input_bytes
    since: float = field(default_factory=time.time)

    @classmethod
    def from_environment(cls) -> RequestFiles:
        return cls(Path(os.environ.get(INPUT_DIR_ENV) or tempfile.gettempdir()))

    def ready(self) -> None:
        """From now on only newly created files are a request's own."""
        self.since = time.time()

    def done(self) -> None:
        """A request ended: the runtime's files created since the previous one ended (this
        request's inputs, failed downloads in between) are removed, and only files created
        from now on count for the next request."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            entries = []
        for entry in entries:
            try:
                status = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (
                RUNTIME_NAME.match(entry.name)
                and stat.S_ISREG(status.st_mode)
                and status.st_ctime >= self.since - CLOCK_SLACK_SECONDS
            ):
                Path(entry.path).unlink(missing_ok=True)
        self.ready()

    def check(self, values: RequestValues) -> None:
        """Raise RequestError for the first file input that is not the request's own."""
        for name, path in request_files(values):
            self.check_file(path, name)

    def check_file(self, value: object, name: str) -> None:
        text = str(value)
        refused = (
            f"{name}: {text[:200]!r} is not a file sent with this request (give an http(s) "
            "URL, a data URI or an upload)"
        )
        # Strings are what the runtime passes on without downloading anything.
        if not isinstance(value, PurePath) or text in ("", ".") or text.startswith("file:"):
            raise RequestError(refused)
        path = Path(value)
        try:
            status = os.lstat(path)
        except OSError as error:
            raise RequestError(refused) from error
        if not stat.S_ISREG(status.st_mode):
            raise RequestError(refused)
        try:
            inside = path.parent.resolve(strict=True) == self.root.resolve(strict=True)
        except OSError:
            inside = False
        if not inside or not RUNTIME_NAME.match(path.name):
            raise RequestError(refused)
        if status.st_ctime < self.since - CLOCK_SLACK_SECONDS:
            raise RequestError(refused)
        if status.st_size > self.max_input_bytes:
            raise RequestError(
                f"{name}: {status.st_size / 1024**3:.2f} GiB; an input file may have at most "
                f"{self.max_input_bytes / 1024**3:.0f} GiB"
            )
