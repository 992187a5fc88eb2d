"""Download frames from the Las Cumbres Observatory science archive.

The archive (https://archive-api.lco.global) is a REST API:

- ``GET /frames/{id}/`` returns one frame record (JSON): ``id``, ``basename``,
  ``filename``, ``url`` (a signed download link for the latest version),
  ``version_set`` (``[{id, created, key, md5, extension, url}]``, newest first),
  and the observation metadata, both under the current names (``site_id``,
  ``primary_optical_element``, ``observation_date`` ...) and the historical FITS
  keyword names (``SITEID``, ``FILTER``, ``DATE_OBS`` ...).
- ``GET /frames/?<filters>`` returns ``{count, next, previous, results}`` pages.

`ArchiveClient` queries it, then downloads with bounded concurrency, retries
with exponential backoff, checks every response against the documented shape,
verifies each file against the archive's md5 and the expected size, writes it
atomically, and skips files already present and verified. Each record is judged
alone: one the archive got wrong (unsafe file name, no url, 404, wrong md5, truncated
body) fails that frame with its reason, the others download, and nothing is written
outside the output directory. `download_frames` is the one-call entry point used by
``daskstack download`` and ``daskstack run``.

Settings, most specific first:

- archive URL: the ``base_url`` argument (``--archive-url``), else the
  environment variable ``DASKSTACK_LCO_ARCHIVE_URL``, else the real archive;
- API token (needed for proprietary data only): the ``token`` argument, else
  the first line of ``token_file``, else the environment variable
  ``LCO_ARCHIVE_TOKEN`` (or another variable named by ``token_env``). The token
  is sent as ``Authorization: Token <token>`` to the archive's own host only
  (never to the storage host of a download link), and is never logged, printed,
  put in an error message or written to a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from ._io import atomic_path

__all__ = [
    "ARCHIVE_URL_ENV",
    "DEFAULT_ARCHIVE_URL",
    "INDEX_NAME",
    "OUTCOMES_NAME",
    "TOKEN_ENV",
    "ArchiveClient",
    "ArchiveError",
    "build_query",
    "DownloadResult",
    "FrameRecord",
    "download_frames",
    "read_index",
    "redact_url",
    "resolve_archive_url",
    "resolve_records",
    "safe_filename",
]

log = logging.getLogger(__name__)

DEFAULT_ARCHIVE_URL = "https://archive-api.lco.global"
ARCHIVE_URL_ENV = "DASKSTACK_LCO_ARCHIVE_URL"
TOKEN_ENV = "LCO_ARCHIVE_TOKEN"
INDEX_NAME = "lco-index.ecsv"
OUTCOMES_NAME = "lco-download.ecsv"  # what became of each record of the last download

#: File name endings accepted from the archive (images daskstack can read).
ALLOWED_SUFFIXES = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".fz")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_CHUNK = 1 << 20
_MAX_BACKOFF = 60.0
# What to do about a record the archive itself got wrong (nothing to retry on our side).
_REPORT_RECORD = "this frame is skipped; report the record to the archive's maintainers"
_INDEX_COLUMNS = (
    "frame_id", "file", "filter", "date_obs", "site", "telescope", "instrument", "object",
    "proposal", "obstype", "rlevel", "exptime", "md5", "size",
)


class ArchiveError(Exception):
    """A request to the archive that failed; ``str(err)`` is one line naming the frame or URL.

    Never contains the API token.
    """

    def __init__(self, message: str, frame_id: int | None = None, status: int | None = None):
        self.frame_id = frame_id
        self.status = status
        super().__init__(message)


class _Transient(Exception):
    """A failure worth retrying: timeout, dropped connection, 5xx/429, truncated body."""


# -- small helpers ---------------------------------------------------------------------------


def resolve_archive_url(base_url: str | None = None) -> str:
    """The archive's base URL: ``base_url`` > ``$DASKSTACK_LCO_ARCHIVE_URL`` > the real archive."""
    url = (base_url or os.environ.get(ARCHIVE_URL_ENV) or DEFAULT_ARCHIVE_URL).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArchiveError(f"archive URL {redact_url(url)!r} is not an http(s) URL")
    return url.rstrip("/")


def redact_url(url: str) -> str:
    """``url`` without credentials, query string or fragment: safe to log or show."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.netloc.rsplit("@", 1)[-1]).lower()


def safe_filename(name, frame_id=None) -> str:
    """The archive's file name if it is a plain, expected FITS file name; else `ArchiveError`.

    Refused: anything with a directory part (``/`` or ``\\``), ``..``, an absolute or
    drive path, a leading dot, characters other than letters, digits and ``._+-``,
    and endings other than the FITS ones daskstack reads.
    """
    where = f"frame {frame_id}" if frame_id is not None else "archive"
    if not isinstance(name, str) or not name:
        raise ArchiveError(f"{where}: the archive gave no file name", frame_id)
    shown = name if len(name) <= 80 else name[:77] + "..."
    if (
        "/" in name or "\\" in name or "\x00" in name or ".." in name
        or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ArchiveError(
            f"{where}: refused unsafe file name {shown!r} from the archive "
            f"(directory parts, '..' and absolute paths are not allowed); {_REPORT_RECORD}",
            frame_id,
        )
    if not _NAME_RE.match(name):
        raise ArchiveError(
            f"{where}: refused file name {shown!r} from the archive (only letters, digits "
            f"and '._+-' are allowed, not starting with a dot); {_REPORT_RECORD}", frame_id
        )
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        raise ArchiveError(
            f"{where}: refused file name {shown!r} from the archive: not a FITS file "
            f"({', '.join(ALLOWED_SUFFIXES)}); {_REPORT_RECORD}", frame_id
        )
    return name


def _frame_id(value) -> int:
    if isinstance(value, bool):
        raise ArchiveError(f"frame id {value!r} is not a positive integer")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ArchiveError(f"frame id {value!r} is not a positive integer") from None
    if number <= 0 or (isinstance(value, float) and not value.is_integer()):
        raise ArchiveError(f"frame id {value!r} is not a positive integer")
    return number


def _text(data: Mapping, *keys) -> str:
    for key in keys:
        value = data.get(key)
        if value is not None and value != "":
            return str(value).strip()
    return ""


def _number(data: Mapping, *keys, kind=float):
    for key in keys:
        value = data.get(key)
        if value is None or value == "" or isinstance(value, bool):
            continue
        try:
            number = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            continue
        if kind is float and not math.isfinite(number):
            continue
        return number
    return None


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRecord:
    """One frame as the archive describes it (the fields daskstack uses).

    ``filename`` is already checked by `safe_filename`; ``md5`` (lower case) and
    ``size`` (bytes) are those of the version ``url`` points at, when the
    archive gives them ("" / None otherwise).
    """

    id: int
    filename: str
    url: str = ""
    basename: str = ""
    filter: str = ""
    date_obs: str = ""
    site: str = ""
    telescope: str = ""
    instrument: str = ""
    object: str = ""
    proposal: str = ""
    obstype: str = ""
    rlevel: int | None = None
    exptime: float | None = None
    md5: str = ""
    size: int | None = None

    def __repr__(self) -> str:  # the signed download URL is long and not for display
        return f"FrameRecord(id={self.id}, filename={self.filename!r})"

    @classmethod
    def from_json(cls, data, expected_id: int | None = None) -> FrameRecord:
        """Build from one frame record of the archive's JSON; `ArchiveError` if it is not one."""
        where = f"frame {expected_id}" if expected_id is not None else "frame record"
        if not isinstance(data, Mapping):
            raise ArchiveError(
                f"{where}: the archive's answer is not a frame record "
                f"(a JSON {type(data).__name__}, expected an object)", expected_id
            )
        if "id" not in data:
            raise ArchiveError(f"{where}: the archive's frame record has no 'id'", expected_id)
        try:
            frame_id = _frame_id(data["id"])
        except ArchiveError:
            raise ArchiveError(
                f"{where}: the archive's frame record has an invalid id {data['id']!r}",
                expected_id,
            ) from None
        if expected_id is not None and frame_id != expected_id:
            raise ArchiveError(
                f"frame {expected_id}: the archive answered with frame {frame_id} instead",
                expected_id,
            )
        where = f"frame {frame_id}"
        versions = data.get("version_set") or []
        if not isinstance(versions, list) or not all(isinstance(v, Mapping) for v in versions):
            raise ArchiveError(f"{where}: 'version_set' is not a list of versions", frame_id)
        url = data.get("url")
        if url is None and versions:
            url = versions[0].get("url")
        # The version the url belongs to: the one with the same url, else the newest (first).
        newest = versions[0] if versions else {}
        version = next((v for v in versions if url and v.get("url") == url), newest)
        basename = _text(data, "basename")
        filename = data.get("filename")
        if filename is None and basename and version.get("extension"):
            filename = f"{basename}{version['extension']}"
        filename = safe_filename(filename, frame_id)
        where = f"frame {frame_id} ({filename})"  # checked: safe to show
        if not isinstance(url, str) or not url:
            raise ArchiveError(
                f"{where}: the archive's record has no download 'url' (the file cannot be "
                "fetched from it now); try again later, or leave this frame out", frame_id
            )
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ArchiveError(
                f"{where}: the download URL {redact_url(url)!r} is not an http(s) URL; "
                f"{_REPORT_RECORD}", frame_id
            )
        md5 = version.get("md5") or ""
        if md5 and (not isinstance(md5, str) or not _MD5_RE.match(md5)):
            raise ArchiveError(
                f"{where}: the archive's md5 {md5!r} is not an md5 checksum; {_REPORT_RECORD}",
                frame_id,
            )
        size = _number(version, "size", kind=int)
        return cls(
            id=frame_id,
            filename=filename,
            url=url,
            basename=basename,
            filter=_text(data, "primary_optical_element", "FILTER"),
            date_obs=_text(data, "observation_date", "DATE_OBS"),
            site=_text(data, "site_id", "SITEID"),
            telescope=_text(data, "telescope_id", "TELID"),
            instrument=_text(data, "instrument_id", "INSTRUME"),
            object=_text(data, "target_name", "OBJECT"),
            proposal=_text(data, "proposal_id", "PROPID"),
            obstype=_text(data, "configuration_type", "OBSTYPE"),
            rlevel=_number(data, "reduction_level", "RLEVEL", kind=int),
            exptime=_number(data, "exposure_time", "EXPTIME"),
            md5=md5.lower(),
            size=size if size and size > 0 else None,
        )


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one frame: ``status`` is "downloaded", "present" or "failed".

    A failed one carries its reason in ``error`` (naming the frame and its file, and what to
    do); ``frame_id`` is None only for a query result whose id was unreadable.
    """

    frame_id: int | None
    path: Path | None
    status: str
    record: FrameRecord | None = None
    md5: str = ""
    size: int | None = None
    error: str = ""
    http_status: int | None = None  # of the failed request, if an HTTP error failed it

    @property
    def ok(self) -> bool:
        return self.status != "failed"


# -- the index of downloaded files -----------------------------------------------------------


def read_index(out_dir) -> dict[int, dict]:
    """``{frame_id: row}`` from ``<out_dir>/lco-index.ecsv``; empty if absent or unreadable."""
    path = Path(out_dir) / INDEX_NAME
    if not path.exists():
        return {}
    from astropy.table import Table

    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as err:  # astropy raises many types for a damaged file
        log.warning("%s: unreadable download index (%s); it will be rewritten", path, err)
        return {}
    rows = {}
    for row in table:
        values = {name: row[name] for name in table.colnames if name in _INDEX_COLUMNS}
        clean = {}
        for name, value in values.items():
            if hasattr(value, "mask") and bool(getattr(value, "mask", False)):
                value = None
            elif hasattr(value, "item"):
                value = value.item()
            clean[name] = value
        try:
            rows[int(clean["frame_id"])] = clean
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def _index_row(result: DownloadResult) -> dict:
    rec = result.record
    return {
        "frame_id": result.frame_id,
        "file": result.path.name if result.path else "",
        "filter": rec.filter if rec else "",
        "date_obs": rec.date_obs if rec else "",
        "site": rec.site if rec else "",
        "telescope": rec.telescope if rec else "",
        "instrument": rec.instrument if rec else "",
        "object": rec.object if rec else "",
        "proposal": rec.proposal if rec else "",
        "obstype": rec.obstype if rec else "",
        "rlevel": rec.rlevel if rec and rec.rlevel is not None else -1,
        "exptime": rec.exptime if rec and rec.exptime is not None else math.nan,
        "md5": result.md5,
        "size": result.size if result.size is not None else -1,
    }


def _write_index(out_dir, results: Iterable[DownloadResult], archive_url: str) -> Path:
    """Merge the successful ``results`` into ``<out_dir>/lco-index.ecsv`` (atomically)."""
    from astropy.table import Table

    path = Path(out_dir) / INDEX_NAME
    rows = read_index(out_dir)
    for result in results:
        if result.ok and result.path is not None:
            rows[result.frame_id] = _index_row(result)
    defaults = {"rlevel": -1, "exptime": math.nan, "size": -1}
    columns = {name: [] for name in _INDEX_COLUMNS}
    for frame_id in sorted(rows):
        row = rows[frame_id]
        for name in _INDEX_COLUMNS:
            value = row.get(name)
            if value is None:
                value = defaults.get(name, "")
            columns[name].append(value)
    table = Table(
        [
            [int(v) for v in columns["frame_id"]],
            *[[str(v) for v in columns[n]] for n in _INDEX_COLUMNS[1:10]],
            [int(v) for v in columns["rlevel"]],
            [float(v) for v in columns["exptime"]],
            [str(v) for v in columns["md5"]],
            [int(v) for v in columns["size"]],
        ],
        names=_INDEX_COLUMNS,
        dtype=[int, *[str] * 9, int, float, str, int],
    )
    table.meta["comments"] = [
        "Frames downloaded from the LCO science archive by daskstack.",
        "rlevel/size -1 and exptime nan: unknown. md5: of the file on disk, checked "
        "against the archive's when it gave one.",
    ]
    table.meta["archive"] = redact_url(archive_url)
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.ecsv")
    return path


# -- the client ------------------------------------------------------------------------------


def _resolve_token(token, token_file, token_env) -> str | None:
    if token:
        return str(token).strip() or None
    if token_file:
        path = Path(token_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ArchiveError(f"cannot read the API token file {path} ({err.strerror})") from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("API token file %s is readable by other users; chmod 600 it", path)
        value = lines[0].strip() if lines else ""
        if not value:
            raise ArchiveError(f"the API token file {path} is empty")
        return value
    return (os.environ.get(token_env or TOKEN_ENV) or "").strip() or None


class ArchiveClient:
    """A client of the LCO science archive.

    Parameters
    ----------
    base_url
        The archive API root; default ``$DASKSTACK_LCO_ARCHIVE_URL`` or the real archive.
    token, token_file, token_env
        The API token, for proprietary data (see the module notes). Public data needs none.
    timeout
        Seconds to wait for the server to connect or to send the next bytes.
    retries
        Retries after a first failed attempt (timeouts, dropped connections, 429, 5xx,
        truncated downloads); the wait doubles each time from ``backoff`` seconds.
    max_workers
        Downloads running at once.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        token_file=None,
        token_env: str = TOKEN_ENV,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_workers: int = 4,
        page_size: int = 500,
        session: requests.Session | None = None,
    ):
        self.base_url = resolve_archive_url(base_url)
        self._token = _resolve_token(token, token_file, token_env)
        if not timeout > 0:
            raise ArchiveError("timeout must be > 0 seconds")
        if retries < 0 or backoff < 0 or max_workers < 1 or page_size < 1:
            raise ArchiveError("retries and backoff must be >= 0, max_workers and page_size >= 1")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_workers = int(max_workers)
        self.page_size = int(page_size)
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, self.max_workers))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "daskstack-archive-client"

    def __repr__(self) -> str:
        token = "set" if self._token else "none"
        return f"ArchiveClient(base_url={redact_url(self.base_url)!r}, token={token})"

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ArchiveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP plumbing ----------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._token and self._token in text:
            text = text.replace(self._token, "***")
        return text

    def _error(self, message: str, frame_id=None, status=None) -> ArchiveError:
        return ArchiveError(self._scrub(message), frame_id, status)

    def _headers(self, url: str) -> dict:
        """The token goes to the archive's own origin only, never to a storage host."""
        if self._token and _origin(url) == _origin(self.base_url):
            return {"Authorization": f"Token {self._token}"}
        return {}

    def _sleep(self, attempt: int, what: str, reason: str) -> None:
        delay = min(self.backoff * 2**attempt, _MAX_BACKOFF)
        log.warning("%s: %s; retry %d/%d in %.2g s", what, self._scrub(reason), attempt + 1,
                    self.retries, delay)
        time.sleep(delay)

    def _check_status(self, response: requests.Response, what: str, frame_id=None,
                      file: bool = False) -> None:
        """Raise for anything but 200 (`_Transient` if worth retrying); ``file``: the
        response is a frame's download link, not an archive record."""
        status = response.status_code
        if status == 200:
            return
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} from {redact_url(response.url)}")
        if status == 401:
            hint = (
                "the API token was rejected" if self._token else
                f"authentication needed: set {TOKEN_ENV} to your LCO archive API token"
            )
            raise self._error(f"{what}: HTTP 401 Unauthorized ({hint})", frame_id, status)
        if status == 403:
            hint = (
                "the API token does not give access to it" if self._token else
                f"proprietary data needs an API token: set {TOKEN_ENV}"
            )
            raise self._error(f"{what}: HTTP 403 Forbidden ({hint})", frame_id, status)
        if status == 404:
            hint = "no such frame" if frame_id is not None else "no such address"
            if file:
                hint = ("the download link is gone or expired: run again for a fresh link; "
                        "if it persists, the archive has lost the file")
            elif frame_id is not None and not self._token:
                hint += f", or it is proprietary and needs an API token ({TOKEN_ENV})"
            raise self._error(
                f"{what}: HTTP 404 Not Found at {redact_url(response.url)} ({hint})",
                frame_id, status,
            )
        detail = ""
        with contextlib.suppress(Exception):  # the server's detail is a courtesy
            detail = response.text[:200].replace("\n", " ").strip()
        raise self._error(
            f"{what}: HTTP {status} from {redact_url(response.url)}"
            + (f": {detail}" if detail else ""), frame_id, status,
        )

    def _get_json(self, url: str, what: str, params=None, frame_id=None):
        last = ""
        for attempt in range(self.retries + 1):
            try:
                log.debug("GET %s", redact_url(url))
                response = self.session.get(
                    url, params=params, headers=self._headers(url), timeout=self.timeout
                )
                with response:
                    self._check_status(response, what, frame_id)
                    try:
                        return response.json()
                    except ValueError:
                        kind = response.headers.get("Content-Type", "unknown type")
                        raise self._error(
                            f"{what}: the archive's answer from {redact_url(response.url)} is not "
                            f"JSON ({kind.split(';')[0]})", frame_id,
                        ) from None
            except _Transient as err:
                last = str(err)
            except (requests.Timeout, requests.ConnectionError) as err:
                last = f"{type(err).__name__} talking to {redact_url(url)}"
            except requests.RequestException as err:
                raise self._error(
                    f"{what}: request failed ({type(err).__name__})", frame_id
                ) from None
            if attempt < self.retries:
                self._sleep(attempt, what, last)
        raise self._error(f"{what}: failed after {self.retries + 1} attempts ({last})", frame_id)

    # -- metadata ---------------------------------------------------------------------------
    def get_frame(self, frame_id) -> FrameRecord:
        """The archive's record of one frame (``GET /frames/{id}/``)."""
        frame_id = _frame_id(frame_id)
        url = f"{self.base_url}/frames/{frame_id}/"
        data = self._get_json(url, f"frame {frame_id}", frame_id=frame_id)
        return FrameRecord.from_json(data, expected_id=frame_id)

    def query_frames(
        self,
        *,
        target: str | None = None,
        ra: float | str | None = None,
        dec: float | str | None = None,
        radius: float | None = None,
        start=None,
        end=None,
        filter: str | None = None,  # noqa: A002 - the archive's own word
        site: str | None = None,
        telescope: str | None = None,
        instrument: str | None = None,
        rlevel: int | None = None,
        proposal: str | None = None,
        obstype: str | None = None,
        basename: str | None = None,
        params: Mapping | None = None,
        limit: int | None = None,
        errors: list | None = None,
    ) -> list[FrameRecord]:
        """Frames matching the filters, following the archive's pages (``next``) to the end.

        ``target`` matches part of the object name (case-insensitive); ``ra``/``dec``
        (degrees, or sexagesimal ``"hh:mm:ss"``/``"dd:mm:ss"``) select frames whose
        footprint covers that point, or comes within ``radius`` degrees of it; ``start``
        and ``end`` bound DATE-OBS (a date-only ``end`` includes that whole day);
        ``rlevel`` 91 = processed by BANZAI, 0 = raw. ``params`` adds raw archive
        filters. At most ``limit`` records are returned (all if None).

        A record that is not a usable frame record (an unsafe file name, no download url
        ...) raises `ArchiveError`; if ``errors`` is a list, it is appended there instead
        (counted in ``limit``), so that one bad record does not lose the others.
        """
        query = build_query(
            target=target, ra=ra, dec=dec, radius=radius, start=start, end=end, filter=filter,
            site=site, telescope=telescope, instrument=instrument, rlevel=rlevel,
            proposal=proposal, obstype=obstype, basename=basename, params=params,
        )
        if limit is not None and limit < 1:
            raise ArchiveError(f"query limit must be >= 1, not {limit}")
        query["limit"] = min(self.page_size, limit) if limit else self.page_size
        query.setdefault("include_related_frames", "false")
        url = f"{self.base_url}/frames/"
        records: list[FrameRecord] = []
        n_bad = 0  # records refused (into ``errors``)
        seen_pages: set[str] = set()
        params_now: dict | None = query
        page = 0
        while url:
            page += 1
            what = f"frame query page {page}"
            data = self._get_json(url, what, params=params_now)
            if (
                not isinstance(data, Mapping) or not isinstance(data.get("results"), list)
                or not (data.get("next") is None or isinstance(data.get("next"), str))
            ):
                raise self._error(
                    f"{what}: the archive's answer from {redact_url(url)} is not a page of "
                    "frames ({count, next, previous, results})"
                )
            for item in data["results"]:
                try:
                    records.append(FrameRecord.from_json(item))
                except ArchiveError as err:
                    if errors is None:
                        raise
                    errors.append(err)
                    n_bad += 1
                if limit and len(records) + n_bad >= limit:
                    break
            count = data.get("count")
            log.info("%s: %d frames so far%s", what, len(records),
                     f" of {count}" if isinstance(count, int) else "")
            enough = limit and len(records) + n_bad >= limit
            if enough or not data["results"] or not data.get("next"):
                break
            url = self._same_origin(data["next"])
            params_now = None  # the next link carries the query
            if url in seen_pages:
                raise self._error(f"{what}: the archive's 'next' link loops back to a seen page")
            seen_pages.add(url)
        unique = {}
        for record in records:
            unique.setdefault(record.id, record)
        return list(unique.values())

    def _same_origin(self, next_url: str) -> str:
        """The ``next`` link, moved onto the configured archive's origin.

        A proxy may make the archive build links with another scheme or host; the token
        must never follow a link to another origin, so only path and query are kept.
        """
        parts = urlsplit(next_url)
        base = urlsplit(self.base_url)
        if not parts.path:
            raise self._error(f"the archive's 'next' link {redact_url(next_url)!r} has no path")
        if _origin(next_url) != _origin(self.base_url):
            log.debug("next link %s moved onto %s", redact_url(next_url), redact_url(self.base_url))
        return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))

    # -- downloads --------------------------------------------------------------------------
    def fetch(self, record: FrameRecord, out_dir, known: Mapping | None = None) -> DownloadResult:
        """Download one frame into ``out_dir`` (thread-safe; raises `ArchiveError`).

        A file already there is kept if it verifies: against the archive's md5, else
        against the md5 recorded in the index (``known``: the index row), else its size.
        """
        out_dir = Path(out_dir)
        dest = out_dir / safe_filename(record.filename, record.id)
        what = f"frame {record.id} ({record.filename})"
        if dest.exists():
            present = self._verify_present(record, dest, known)
            if present is not None:
                log.info("%s: already present and verified", what)
                return present
            log.info("%s: the file present does not verify; downloading again", what)
        if not record.url:
            raise self._error(f"{what}: no download URL known; ask the archive for the frame "
                              "again (by its id)", record.id)
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._stream(record, dest, what)
            except _Transient as err:
                last = str(err)
            except (requests.Timeout, requests.ConnectionError) as err:
                last = f"{type(err).__name__} downloading from {redact_url(record.url)}"
            except requests.exceptions.ChunkedEncodingError:
                last = f"truncated download: the connection broke off ({redact_url(record.url)})"
            except requests.RequestException as err:
                raise self._error(f"{what}: download failed ({type(err).__name__})",
                                  record.id) from None
            if attempt < self.retries:
                self._sleep(attempt, what, last)
        raise self._error(
            f"{what}: download failed after {self.retries + 1} attempts ({last}); nothing "
            "written; run again later to retry", record.id,
        )

    def _verify_present(self, record, dest: Path, known) -> DownloadResult | None:
        """A "present" result if ``dest`` verifies, else None (then it is downloaded again)."""
        size = dest.stat().st_size
        if record.size and size != record.size:
            return None
        expected = record.md5
        if not expected and known and known.get("file") == dest.name:
            expected = str(known.get("md5") or "").lower()
        if not expected and not record.size:
            return None  # nothing to verify against
        md5 = _file_md5(dest)
        if expected and md5 != expected:
            return None
        return DownloadResult(record.id, dest, "present", record, md5, size)

    def _stream(self, record: FrameRecord, dest: Path, what: str) -> DownloadResult:
        headers = {"Accept-Encoding": "identity", **self._headers(record.url)}
        log.debug("GET %s", redact_url(record.url))
        response = self.session.get(record.url, headers=headers, stream=True, timeout=self.timeout)
        with response:
            self._check_status(response, what, record.id, file=True)
            ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype in ("text/html", "application/json", "application/xml", "text/xml"):
                raise self._error(
                    f"{what}: the download URL answered with {ctype}, not a FITS file; "
                    "nothing written", record.id,
                )
            expected = record.size
            if expected is None and not response.headers.get("Content-Encoding"):
                expected = _number(response.headers, "Content-Length", kind=int)
            digest = hashlib.md5(usedforsecurity=False)
            nbytes = 0
            head = b""
            with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
                for chunk in response.iter_content(_CHUNK):
                    if not chunk:
                        continue
                    if len(head) < 16:
                        head += chunk[:16]
                        if len(head) >= 16:
                            self._check_magic(head, record, what)
                    digest.update(chunk)
                    nbytes += len(chunk)
                    handle.write(chunk)
                handle.flush()
                if nbytes == 0:
                    raise self._error(f"{what}: the archive sent an empty file", record.id)
                if len(head) < 16:
                    self._check_magic(head, record, what)
                if expected is not None and nbytes != expected:
                    raise _Transient(f"truncated download: got {nbytes} of {expected} bytes")
                md5 = digest.hexdigest()
                if record.md5 and md5 != record.md5:
                    raise self._error(
                        f"{what}: checksum mismatch: md5 {md5} of the {nbytes} bytes received, "
                        f"the archive says {record.md5}; nothing written; run again to retry "
                        "(if it persists, the archive's copy is damaged)", record.id,
                    )
        log.info("%s: downloaded %d bytes", what, nbytes)
        return DownloadResult(record.id, dest, "downloaded", record, md5, nbytes)

    def _check_magic(self, head: bytes, record: FrameRecord, what: str) -> None:
        gzip = record.filename.lower().endswith(".gz")
        ok = head.startswith(b"\x1f\x8b") if gzip else head.startswith(b"SIMPLE")
        if not ok:
            kind = "gzip" if gzip else "FITS"
            raise self._error(
                f"{what}: the downloaded data is not a {kind} file "
                f"(starts with {head[:12]!r}); nothing written", record.id,
            )

    def download(
        self,
        records: Iterable[FrameRecord],
        out_dir,
        index: bool = True,
        raise_errors: bool = True,
    ) -> list[DownloadResult]:
        """Download ``records`` into ``out_dir`` (``max_workers`` at once), in their order.

        Files present and verified are not fetched again. With ``index``, the
        successful ones are merged into ``<out_dir>/lco-index.ecsv``. With
        ``raise_errors``, an `ArchiveError` naming the failed frames is raised after
        every download has finished (and the index is written); otherwise failures
        are returned as results with status "failed".
        """
        records = list(records)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names: dict[str, int] = {}
        unique: list[FrameRecord] = []
        clashes: dict[int, str] = {}  # frame id -> why it is not fetched
        ids: set[int] = set()
        for record in records:
            if record.id in ids:
                continue
            ids.add(record.id)
            other = names.setdefault(record.filename, record.id)
            if other != record.id:  # the first keeps the name; this one would overwrite it
                clashes[record.id] = (
                    f"frame {record.id} ({record.filename}): frame {other} has the same file "
                    f"name; {_REPORT_RECORD}"
                )
            unique.append(record)
        known = read_index(out_dir)

        def one(record):
            try:
                if record.id in clashes:
                    raise self._error(clashes[record.id], record.id)
                return self.fetch(record, out_dir, known.get(record.id))
            except ArchiveError as err:
                return _failed(err, record)

        if len(unique) <= 1 or self.max_workers == 1:
            results = [one(r) for r in unique]
        else:
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="lco-download") as pool:
                results = list(pool.map(one, unique))
        if index and any(r.ok for r in results):
            _write_index(out_dir, results, self.base_url)
        if raise_errors:
            _raise_failures(results)
        return results


def _failed(err: ArchiveError, record: FrameRecord | None = None,
            frame_id: int | None = None) -> DownloadResult:
    """The result of a frame that failed with ``err`` (logged: the batch goes on)."""
    log.error("%s", err)
    if record is not None:
        frame_id = record.id
    return DownloadResult(frame_id or err.frame_id, None, "failed", record, error=str(err),
                          http_status=err.status)


def _raise_failures(results: Iterable[DownloadResult]) -> None:
    """`ArchiveError` naming the first failed frame and how many more failed, if any did."""
    failed = [r for r in results if not r.ok]
    if failed:
        more = f" (and {len(failed) - 1} more failed)" if len(failed) > 1 else ""
        raise ArchiveError(f"{failed[0].error}{more}", failed[0].frame_id, failed[0].http_status)


# -- queries ---------------------------------------------------------------------------------


def _angle(value, unit: str, name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            from astropy.coordinates import Angle

            try:
                number = float(Angle(text, unit=unit).deg)
            except Exception:  # noqa: BLE001 - astropy raises several types
                raise ArchiveError(f"{name} {value!r} is not an angle") from None
    if not math.isfinite(number):
        raise ArchiveError(f"{name} {value!r} is not finite")
    return number


def _when(value, name: str, end: bool = False) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return f"{value.isoformat()}T23:59:59" if end else value.isoformat()
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ArchiveError(
            f"{name} {value!r} is not a date or time (expected e.g. 2021-05-06 or "
            "2021-05-06T03:00:00)"
        ) from None
    if end and len(text) == 10:  # a date alone: the whole day
        return f"{parsed.date().isoformat()}T23:59:59"
    return text


def _wrap_lon(ra: float) -> float:
    lon = (ra + 180.0) % 360.0 - 180.0
    return 180.0 if lon == -180.0 and ra > 0 else lon


def _cone_polygon(ra: float, dec: float, radius: float, n: int = 24) -> str:
    """WKT polygon approximating a circle of ``radius`` degrees on the sky (lon, lat order)."""
    ra0, dec0, r = math.radians(ra), math.radians(dec), math.radians(radius)
    points = []
    for k in range(n):
        theta = 2 * math.pi * k / n
        sin_d = math.sin(dec0) * math.cos(r) + math.cos(dec0) * math.sin(r) * math.cos(theta)
        d = math.asin(max(-1.0, min(1.0, sin_d)))
        a = ra0 + math.atan2(
            math.sin(theta) * math.sin(r) * math.cos(dec0), math.cos(r) - math.sin(dec0) * sin_d
        )
        points.append(f"{_wrap_lon(math.degrees(a)):.6f} {math.degrees(d):.6f}")
    points.append(points[0])
    return f"POLYGON(({', '.join(points)}))"


def build_query(
    *,
    target=None, ra=None, dec=None, radius=None, start=None, end=None, filter=None,  # noqa: A002
    site=None, telescope=None, instrument=None, rlevel=None, proposal=None, obstype=None,
    basename=None, params=None,
) -> dict:
    """The archive's ``/frames/`` query parameters for these filters (checked)."""
    query: dict = {}
    simple = {
        "target_name": target, "primary_optical_element": filter, "site_id": site,
        "telescope_id": telescope, "instrument_id": instrument, "proposal_id": proposal,
        "configuration_type": obstype, "basename": basename,
    }
    for key, value in simple.items():
        if value is not None and str(value).strip():
            query[key] = str(value).strip()
    if rlevel is not None:
        try:
            query["reduction_level"] = int(rlevel)
        except (TypeError, ValueError):
            raise ArchiveError(
                f"reduction level {rlevel!r} is not an integer (91 = processed)"
            ) from None
    if start is not None:
        query["start"] = _when(start, "start")
    if end is not None:
        query["end"] = _when(end, "end", end=True)
    if (ra is None) != (dec is None):
        raise ArchiveError("give both RA and Dec for a position search")
    if ra is not None:
        ra_deg = _angle(ra, "hourangle", "RA")
        dec_deg = _angle(dec, "deg", "Dec")
        if not -90.0 <= dec_deg <= 90.0:
            raise ArchiveError(f"Dec {dec!r} is outside [-90, 90] degrees")
        if radius:
            radius = float(radius)
            if not 0 < radius <= 10:
                raise ArchiveError(f"search radius {radius} must be in (0, 10] degrees")
            query["intersects"] = _cone_polygon(ra_deg % 360.0, dec_deg, radius)
        else:
            query["covers"] = f"POINT({_wrap_lon(ra_deg % 360.0):.6f} {dec_deg:.6f})"
    elif radius:
        raise ArchiveError("a search radius needs RA and Dec")
    if params:
        query.update({str(k): v for k, v in params.items()})
    return query


# -- one call --------------------------------------------------------------------------------


def download_frames(
    ids: Iterable | None = None,
    query: Mapping | None = None,
    out_dir=".",
    *,
    limit: int | None = None,
    client: ArchiveClient | None = None,
    base_url: str | None = None,
    token: str | None = None,
    token_file=None,
    token_env: str = TOKEN_ENV,
    max_workers: int = 4,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 1.0,
    index: bool = True,
    results: list | None = None,
    raise_errors: bool = True,
) -> list[Path]:
    """Download frames by id and/or by query into ``out_dir``; the local paths, in order.

    ``ids`` come first (in the order given), then the query's matches (archive order,
    at most ``limit``), without duplicates. ``query`` holds `ArchiveClient.query_frames`
    keywords (``target``, ``ra``, ``dec``, ``radius``, ``start``, ``end``, ``filter``,
    ``site``, ``telescope``, ``instrument``, ``rlevel``, ``proposal``, ``obstype`` ...).
    A frame id already in the index whose file still verifies against the recorded
    md5 costs no request at all.

    Each record is judged alone: a bad one (unsafe file name, no url, 404, wrong md5,
    truncated body ...) fails that frame only, and the others are downloaded and
    indexed. With ``index``, the outcome of every frame (downloaded, present, failed and
    why) is written to ``<out_dir>/lco-download.ecsv``. Then, with ``raise_errors``, an
    `ArchiveError` names the failed frames; without it the paths of the frames that
    made it are returned. If ``results`` is a list, the `DownloadResult` of every frame
    (failed ones too) is appended to it. A failure of the whole request (the archive
    unreachable, a query page it cannot answer) raises `ArchiveError` either way.
    """
    ids = [_frame_id(i) for i in (ids or [])]
    if not ids and not query:
        raise ArchiveError("nothing to download: give frame ids or query filters")
    own = client is None
    if own:
        client = ArchiveClient(
            base_url, token, token_file=token_file, token_env=token_env, timeout=timeout,
            retries=retries, backoff=backoff, max_workers=max_workers,
        )
    out_dir = Path(out_dir)
    try:
        known = read_index(out_dir)
        present: dict[int, DownloadResult] = {}
        to_get: list[int] = []
        for frame_id in dict.fromkeys(ids):
            row = known.get(frame_id)
            path = out_dir / str(row.get("file") or "") if row else None
            if (
                row and row.get("md5") and _safe_name(row.get("file")) and path.is_file()
                and _file_md5(path) == str(row["md5"]).lower()
            ):
                present[frame_id] = DownloadResult(
                    frame_id, path, "present", _record_from_row(row), str(row["md5"]),
                    path.stat().st_size,
                )
                log.info("frame %d (%s): already present and verified", frame_id, path.name)
                continue
            to_get.append(frame_id)
        records, refused = resolve_records(client, to_get, query, limit)
        wanted = [r for r in records if r.id not in present]
        fetched = client.download(wanted, out_dir, index=index, raise_errors=False)
        by_id = {r.frame_id: r for r in [*refused, *fetched] if r.frame_id is not None}
        by_id.update(present)
        order = dict.fromkeys([*ids, *(r.id for r in wanted)])
        final = [by_id[i] for i in order if i in by_id]
        final += [r for r in refused if r.frame_id is None or r.frame_id not in order]
        if index:
            _write_outcomes(out_dir, final)
        if results is not None:
            results.extend(final)
        if raise_errors:
            _raise_failures(final)
        return [r.path for r in final if r.ok]
    finally:
        if own:
            client.close()


def resolve_records(
    client: ArchiveClient, ids: Iterable = (), query: Mapping | None = None,
    limit: int | None = None,
) -> tuple[list[FrameRecord], list[DownloadResult]]:
    """The archive's records for ``ids`` (fetched concurrently), then the ``query``'s matches.

    Judged one by one: a frame whose record cannot be had or used (404, an unsafe file
    name, no url ...) becomes a "failed" `DownloadResult` with its reason, and the others
    are returned as records, ids first, without duplicates. A failure of the query
    itself (a page the archive cannot give) raises `ArchiveError`.
    """
    ids = list(dict.fromkeys(_frame_id(i) for i in ids))
    refused: list[DownloadResult] = []
    records: list[FrameRecord] = []

    def get(frame_id):
        try:
            return client.get_frame(frame_id)
        except ArchiveError as err:
            return err

    if len(ids) <= 1 or client.max_workers == 1:
        answers = [get(i) for i in ids]
    else:
        with ThreadPoolExecutor(client.max_workers, thread_name_prefix="lco-record") as pool:
            answers = list(pool.map(get, ids))
    for frame_id, answer in zip(ids, answers, strict=True):
        if isinstance(answer, ArchiveError):
            refused.append(_failed(answer, frame_id=frame_id))
        else:
            records.append(answer)
    if query:
        errors: list[ArchiveError] = []
        records.extend(client.query_frames(**dict(query), limit=limit, errors=errors))
        refused.extend(_failed(err) for err in errors)
    unique: dict[int, FrameRecord] = {}
    for record in records:
        unique.setdefault(record.id, record)
    return list(unique.values()), refused


def _write_outcomes(out_dir, results: Iterable[DownloadResult]) -> Path:
    """``<out_dir>/lco-download.ecsv``: frame, file, status and reason of each frame of the
    last download (replaced each time; the index keeps what is on disk)."""
    from astropy.table import Table

    results = list(results)
    table = Table(
        [
            [r.frame_id if r.frame_id is not None else -1 for r in results],
            [r.path.name if r.path else (r.record.filename if r.record else "")
             for r in results],
            [r.status for r in results],
            [r.error for r in results],
        ],
        names=("frame_id", "file", "status", "reason"),
        dtype=(int, str, str, str),
    )
    table.meta["comments"] = [
        "What became of each frame of the last daskstack download: downloaded, present "
        "(already there and verified) or failed (reason: what went wrong and what to do). "
        "frame_id -1: the archive's record had no readable id.",
    ]
    path = Path(out_dir) / OUTCOMES_NAME
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.ecsv")
    return path


def _safe_name(name) -> bool:
    try:
        safe_filename(name)
    except ArchiveError:
        return False
    return True


def _record_from_row(row: Mapping) -> FrameRecord:
    rlevel = row.get("rlevel")
    exptime = row.get("exptime")
    size = row.get("size")
    return FrameRecord(
        id=int(row["frame_id"]),
        filename=str(row["file"]),
        filter=str(row.get("filter") or ""),
        date_obs=str(row.get("date_obs") or ""),
        site=str(row.get("site") or ""),
        telescope=str(row.get("telescope") or ""),
        instrument=str(row.get("instrument") or ""),
        object=str(row.get("object") or ""),
        proposal=str(row.get("proposal") or ""),
        obstype=str(row.get("obstype") or ""),
        rlevel=int(rlevel) if rlevel is not None and int(rlevel) >= 0 else None,
        exptime=float(exptime) if exptime is not None and math.isfinite(float(exptime)) else None,
        md5=str(row.get("md5") or ""),
        size=int(size) if size is not None and int(size) > 0 else None,
    )
