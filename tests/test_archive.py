"""The LCO archive client against a real HTTP server on 127.0.0.1 (pytest-httpserver).

The server speaks the archive's JSON shapes (``/frames/{id}/`` records and paginated
``/frames/`` lists, with ``version_set`` md5s) and serves small fake FITS bodies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from werkzeug import Request, Response

pytest.importorskip("pytest_httpserver")

from daskstack import archive  # noqa: E402
from daskstack.archive import (  # noqa: E402
    ArchiveClient,
    ArchiveError,
    FrameRecord,
    download_frames,
    read_index,
    safe_filename,
)

TOKEN = "s3cr3t-TOKEN-0123456789abcdef"


def fits_body(seed: int, size: int = 2880) -> bytes:
    """A small fake FITS body (starts like FITS; the client checks the magic)."""
    head = f"SIMPLE  =                    T / fake frame {seed}".ljust(80).encode()
    filler = bytes((seed * 7 + i) % 251 for i in range(size - len(head)))
    return head + filler


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def url_for(server, path: str, host: str = "127.0.0.1") -> str:
    """A URL of the test server by IP (pytest-httpserver names it "localhost")."""
    return server.url_for(path).replace("localhost", host, 1)


def frame_json(server, frame_id: int, body: bytes, *, filename=None, md5sum=None,
               file_path=None, host=None, **extra) -> dict:
    """A frame record shaped like the archive's (new and historical field names)."""
    basename = f"ogg2m001-ep02-20210506-{frame_id % 10000:04d}-e91"
    filename = filename if filename is not None else f"{basename}.fits.fz"
    url = url_for(server, file_path or f"/files/{frame_id}.fits.fz", host or "127.0.0.1")
    url += "?X-Amz-Signature=abc123&X-Amz-Expires=172800"
    record = {
        "id": frame_id,
        "basename": basename,
        "area": {"type": "Polygon", "coordinates": [[[10.0, -20.0], [10.1, -20.0],
                                                     [10.1, -19.9], [10.0, -20.0]]]},
        "related_frames": [],
        "version_set": [{
            "id": frame_id * 10, "created": "2021-05-06T10:00:00.000000Z", "key": "k" * 32,
            "md5": md5sum if md5sum is not None else md5(body), "extension": ".fits.fz",
            "url": url,
        }],
        "filename": filename,
        "url": url,
        "reduction_level": 91, "RLEVEL": 91,
        "observation_date": "2021-05-06T03:45:41.123000Z",
        "DATE_OBS": "2021-05-06T03:45:41.123000Z",
        "observation_day": "2021-05-05", "DAY_OBS": "2021-05-05",
        "proposal_id": "LCOEPO2014B-010", "PROPID": "LCOEPO2014B-010",
        "instrument_id": "ep02", "INSTRUME": "ep02",
        "target_name": "M 66", "OBJECT": "M 66",
        "site_id": "ogg", "SITEID": "ogg",
        "telescope_id": "2m0a", "TELID": "2m0a",
        "exposure_time": 60.0, "EXPTIME": "60.000000",
        "primary_optical_element": "rp", "FILTER": "rp",
        "public_date": "2022-05-06T03:45:41Z", "L1PUBDAT": "2022-05-06T03:45:41Z",
        "configuration_type": "EXPOSE", "OBSTYPE": "EXPOSE",
        "observation_id": 123, "BLKUID": 123, "request_id": 456, "REQNUM": 456,
    }
    record.update(extra)
    return record


def serve_frame(server, frame_id: int, body: bytes, **kwargs) -> dict:
    record = frame_json(server, frame_id, body, **kwargs)
    server.expect_request(f"/frames/{frame_id}/").respond_with_json(record)
    server.expect_request(urlsplit(record["url"]).path).respond_with_data(
        body, content_type="application/octet-stream"
    )
    return record


def file_requests(server) -> list[str]:
    return [req.path for req, _ in server.log if req.path.startswith("/files/")]


@pytest.fixture
def client(httpserver, monkeypatch):
    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    monkeypatch.delenv("DASKSTACK_LCO_ARCHIVE_URL", raising=False)
    with ArchiveClient(url_for(httpserver, "/"), timeout=5, retries=2, backoff=0.01,
                       max_workers=2) as c:
        yield c


def no_partial_files(directory: Path) -> bool:
    """Nothing but the index and the outcomes record (no data files, no temporaries)."""
    return not directory.exists() or all(
        p.name in (archive.INDEX_NAME, archive.OUTCOMES_NAME) for p in directory.iterdir()
    )


# -- settings -----------------------------------------------------------------------------


def test_base_url_resolution(monkeypatch):
    monkeypatch.delenv("DASKSTACK_LCO_ARCHIVE_URL", raising=False)
    assert archive.resolve_archive_url() == "https://archive-api.lco.global"
    monkeypatch.setenv("DASKSTACK_LCO_ARCHIVE_URL", "http://mirror.example:8000/lco/")
    assert archive.resolve_archive_url() == "http://mirror.example:8000/lco"
    assert archive.resolve_archive_url("http://127.0.0.1:9") == "http://127.0.0.1:9"
    with pytest.raises(ArchiveError, match="not an http"):
        archive.resolve_archive_url("ftp://example.org")


def test_token_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LCO_ARCHIVE_TOKEN", "from-env")
    assert ArchiveClient("http://127.0.0.1:9")._token == "from-env"
    assert ArchiveClient("http://127.0.0.1:9", token="explicit")._token == "explicit"
    monkeypatch.setenv("MY_TOKEN", "other-env")
    assert ArchiveClient("http://127.0.0.1:9", token_env="MY_TOKEN")._token == "other-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    assert ArchiveClient("http://127.0.0.1:9", token_file=token_file)._token == "from-file"
    monkeypatch.delenv("LCO_ARCHIVE_TOKEN")
    assert not ArchiveClient("http://127.0.0.1:9").has_token
    assert "from-env" not in repr(ArchiveClient("http://127.0.0.1:9", token="from-env"))


# -- records and queries ------------------------------------------------------------------


def test_get_frame_parses_the_archive_record(httpserver, client):
    body = fits_body(1)
    serve_frame(httpserver, 915222, body)
    rec = client.get_frame(915222)
    assert isinstance(rec, FrameRecord)
    assert rec.id == 915222
    assert rec.filename == "ogg2m001-ep02-20210506-5222-e91.fits.fz"
    assert (rec.filter, rec.site, rec.telescope, rec.instrument) == ("rp", "ogg", "2m0a", "ep02")
    assert rec.date_obs.startswith("2021-05-06T03:45:41")
    assert (rec.rlevel, rec.proposal, rec.object, rec.obstype) == (91, "LCOEPO2014B-010",
                                                                   "M 66", "EXPOSE")
    assert rec.exptime == 60.0
    assert rec.md5 == md5(body) and rec.size is None
    assert "X-Amz-Signature" not in repr(rec)


def test_record_with_only_historical_names_and_missing_optionals(httpserver):
    body = fits_body(2)
    data = {"id": 7, "filename": "a-e91.fits.fz", "url": "http://127.0.0.1/x",
            "FILTER": "V", "SITEID": "lsc", "DATE_OBS": "2020-01-01T00:00:00Z", "RLEVEL": 0}
    rec = FrameRecord.from_json(data)
    assert (rec.filter, rec.site, rec.rlevel, rec.md5, rec.telescope) == ("V", "lsc", 0, "", "")
    # No filename: built from basename + the version's extension.
    data2 = frame_json(httpserver, 8, body, filename=None)
    del data2["filename"]
    assert FrameRecord.from_json(data2).filename.endswith("-e91.fits.fz")


@pytest.mark.parametrize("payload, match", [
    ({"detail": "x"}, "no 'id'"),
    ([1, 2], "not a frame record"),
    ({"id": 5, "filename": "a.fits"}, "no download 'url'"),
    ({"id": 5, "filename": "a.fits", "url": "file:///etc/passwd"}, "not an http"),
    ({"id": 5, "filename": "a.fits", "url": "http://h/x", "version_set": "v"}, "version_set"),
    ({"id": 5, "filename": "a.fits", "url": "http://h/x",
      "version_set": [{"md5": "not-an-md5", "url": "http://h/x"}]}, "not an md5"),
    ({"id": 6, "filename": "a.fits", "url": "http://h/x"}, "answered with frame 6"),
])
def test_malformed_records_are_rejected(httpserver, client, tmp_path, payload, match):
    httpserver.expect_request("/frames/5/").respond_with_json(payload)
    with pytest.raises(ArchiveError, match=match) as err:
        download_frames([5], out_dir=tmp_path / "out", client=client)
    assert "frame 5" in str(err.value) or "frame record" in str(err.value)
    assert no_partial_files(tmp_path / "out")


def test_non_json_answer_is_rejected(httpserver, client):
    httpserver.expect_request("/frames/5/").respond_with_data(
        "<html>maintenance</html>", content_type="text/html")
    with pytest.raises(ArchiveError, match=r"frame 5: .*not JSON \(text/html\)"):
        client.get_frame(5)


def paginated_handler(records: list[dict], seen: list[dict]):
    """A ``/frames/`` endpoint with limit/offset pages and absolute ``next`` links."""

    def handler(request: Request) -> Response:
        args = {k: v[0] for k, v in parse_qs(request.query_string.decode()).items()}
        seen.append(args)
        limit = int(args.get("limit", 100))
        offset = int(args.get("offset", 0))
        page = records[offset:offset + limit]
        nxt = None
        if offset + limit < len(records):
            rest = {k: v for k, v in args.items() if k not in ("offset",)}
            query = "&".join(f"{k}={v}" for k, v in {**rest, "offset": offset + limit}.items())
            nxt = f"{request.host_url.rstrip('/')}/frames/?{query}"
        prev = None if offset == 0 else f"{request.host_url}frames/?offset={offset - limit}"
        payload = {"count": len(records), "next": nxt, "previous": prev, "results": page}
        return Response(json.dumps(payload), content_type="application/json")

    return handler


def test_query_follows_pagination_to_the_end(httpserver, client):
    records = [frame_json(httpserver, 1000 + i, fits_body(i)) for i in range(7)]
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, seen))
    client.page_size = 3
    found = client.query_frames(target="M 66", start="2021-05-01", end="2021-05-31",
                                filter="rp", site="ogg", telescope="2m0a", instrument="ep02",
                                rlevel=91, proposal="LCOEPO2014B-010", obstype="EXPOSE")
    assert [r.id for r in found] == [1000 + i for i in range(7)]
    assert len(seen) == 3  # pages of 3, 3, 1
    first = seen[0]
    assert first["target_name"] == "M 66"
    assert first["start"] == "2021-05-01"
    assert first["end"] == "2021-05-31T23:59:59"  # a date-only end includes the whole day
    assert (first["primary_optical_element"], first["site_id"], first["telescope_id"],
            first["instrument_id"], first["reduction_level"], first["proposal_id"],
            first["configuration_type"]) == ("rp", "ogg", "2m0a", "ep02", "91",
                                             "LCOEPO2014B-010", "EXPOSE")
    assert [s.get("offset") for s in seen] == [None, "3", "6"]


def test_query_limit_stops_paging(httpserver, client):
    records = [frame_json(httpserver, 2000 + i, fits_body(i)) for i in range(10)]
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, seen))
    client.page_size = 3
    found = client.query_frames(site="ogg", limit=5)
    assert [r.id for r in found] == [2000, 2001, 2002, 2003, 2004]
    assert len(seen) == 2


def test_query_cone_and_point(httpserver, client):
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler([], seen))
    assert client.query_frames(ra="11:20:15", dec="+12:59:30") == []
    assert seen[-1]["covers"] == "POINT(170.062500 12.991667)"
    client.query_frames(ra=350.0, dec=-20.0, radius=0.2)
    polygon = seen[-1]["intersects"]
    assert polygon.startswith("POLYGON((-10.000000 -19.800000")
    with pytest.raises(ArchiveError, match="both RA and Dec"):
        client.query_frames(ra=10.0)
    with pytest.raises(ArchiveError, match="not a date"):
        client.query_frames(start="yesterday")


def test_query_rejects_a_page_that_is_not_a_page(httpserver, client):
    httpserver.expect_request("/frames/").respond_with_json({"frames": []})
    with pytest.raises(ArchiveError, match="not a page of frames"):
        client.query_frames(site="ogg")


def test_next_link_to_another_host_is_kept_on_the_archive(httpserver, monkeypatch):
    """A ``next`` link pointing elsewhere must not take the token with it."""
    records = [frame_json(httpserver, 3000 + i, fits_body(i)) for i in range(2)]
    calls = []

    def handler(request: Request) -> Response:
        calls.append(request.headers.get("Authorization"))
        args = parse_qs(request.query_string.decode())
        if "offset" not in args:
            body = {"count": 2, "next": "http://evil.example:1/frames/?offset=1&limit=1",
                    "previous": None, "results": records[:1]}
        else:
            body = {"count": 2, "next": None, "previous": None, "results": records[1:]}
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request("/frames/").respond_with_handler(handler)
    client = ArchiveClient(url_for(httpserver, "/"), token=TOKEN, timeout=5, retries=0)
    found = client.query_frames(site="ogg", limit=5)
    assert [r.id for r in found] == [3000, 3001]
    assert calls == [f"Token {TOKEN}"] * 2  # both pages from our server, none from evil.example


# -- downloads ----------------------------------------------------------------------------


def test_download_by_ids_writes_verified_files_and_index(httpserver, client, tmp_path):
    bodies = {915222: fits_body(1), 934536: fits_body(2, 5760)}
    for frame_id, body in bodies.items():
        serve_frame(httpserver, frame_id, body)
    out = tmp_path / "frames"
    results: list = []
    paths = download_frames([934536, 915222], out_dir=out, client=client, results=results)
    assert [p.name for p in paths] == ["ogg2m001-ep02-20210506-4536-e91.fits.fz",
                                       "ogg2m001-ep02-20210506-5222-e91.fits.fz"]
    assert paths[0].read_bytes() == bodies[934536]
    assert paths[1].read_bytes() == bodies[915222]
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    index = read_index(out)
    assert set(index) == {915222, 934536}
    row = index[915222]
    assert row["file"] == paths[1].name
    assert (row["filter"], row["site"], row["rlevel"]) == ("rp", "ogg", 91)
    assert row["date_obs"].startswith("2021-05-06T03:45:41")
    assert row["md5"] == md5(bodies[915222]) and row["size"] == len(bodies[915222])
    text = (out / archive.INDEX_NAME).read_text()
    assert "X-Amz-Signature" not in text and "/files/" not in text
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in paths),
                                                            archive.INDEX_NAME,
                                                            archive.OUTCOMES_NAME])

    # A later download merges into the index.
    serve_frame(httpserver, 5, fits_body(5))
    download_frames([5], out_dir=out, client=client)
    from astropy.table import Table

    table = Table.read(out / archive.INDEX_NAME, format="ascii.ecsv")
    assert sorted(table["frame_id"]) == [5, 915222, 934536]
    for column in ("frame_id", "file", "filter", "date_obs", "site", "md5"):
        assert column in table.colnames


def test_second_run_downloads_nothing(httpserver, client, tmp_path):
    bodies = {11: fits_body(11), 12: fits_body(12)}
    for frame_id, body in bodies.items():
        serve_frame(httpserver, frame_id, body)
    out = tmp_path / "out"
    first = download_frames([11, 12], out_dir=out, client=client)
    assert len(file_requests(httpserver)) == 2
    n_requests = len(httpserver.log)
    stamps = [p.stat().st_mtime_ns for p in first]

    results: list = []
    second = download_frames([11, 12], out_dir=out, client=client, results=results)
    assert second == first
    assert [r.status for r in results] == ["present", "present"]
    assert len(httpserver.log) == n_requests  # by id: verified against the index, no request
    assert [p.stat().st_mtime_ns for p in second] == stamps

    # Through the records (e.g. a query): metadata asked, but no file fetched again.
    records = [client.get_frame(11), client.get_frame(12)]
    again = client.download(records, out)
    assert [r.status for r in again] == ["present", "present"]
    assert len(file_requests(httpserver)) == 2

    # A damaged file does not verify: fetched again.
    first[0].write_bytes(b"SIMPLE  = damaged")
    again = client.download(records, out)
    assert [r.status for r in again] == ["downloaded", "present"]
    assert first[0].read_bytes() == bodies[11]


def test_query_download_feeds_paths_in_order(httpserver, client, tmp_path):
    bodies = [fits_body(i) for i in range(5)]
    records = [frame_json(httpserver, 4000 + i, b) for i, b in enumerate(bodies)]
    for i, body in enumerate(bodies):
        httpserver.expect_request(f"/files/{4000 + i}.fits.fz").respond_with_data(body)
    serve_frame(httpserver, 77, fits_body(77))
    httpserver.expect_request("/frames/4001/").respond_with_json(records[1])
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, seen))
    client.page_size = 2
    paths = download_frames([77, 4001], query={"target": "M 66", "rlevel": 91},
                            out_dir=tmp_path, client=client, limit=4)
    ids = [int(p.name.split("-")[3]) for p in paths]
    assert ids == [77, 4001, 4000, 4002, 4003]  # ids first, then the query, no duplicates
    assert all(p.read_bytes()[:6] == b"SIMPLE" for p in paths)


def test_500_then_success_is_retried(httpserver, client, tmp_path, caplog):
    body = fits_body(3)
    record = frame_json(httpserver, 31, body)
    httpserver.expect_ordered_request("/frames/31/").respond_with_data("oops", status=503)
    httpserver.expect_ordered_request("/frames/31/").respond_with_json(record)
    httpserver.expect_ordered_request("/files/31.fits.fz").respond_with_data("boom", status=500)
    httpserver.expect_ordered_request("/files/31.fits.fz").respond_with_data(body)
    with caplog.at_level(logging.WARNING, logger="daskstack.archive"):
        paths = download_frames([31], out_dir=tmp_path, client=client)
    assert paths[0].read_bytes() == body
    assert "HTTP 503" in caplog.text and "HTTP 500" in caplog.text and "retry 1/2" in caplog.text
    httpserver.check_assertions()


def test_persistent_500_fails_naming_the_frame(httpserver, client, tmp_path):
    body = fits_body(4)
    record = frame_json(httpserver, 41, body)
    httpserver.expect_request("/frames/41/").respond_with_json(record)
    httpserver.expect_request("/files/41.fits.fz").respond_with_data("boom", status=502)
    with pytest.raises(ArchiveError, match=r"frame 41 .*failed after 3 attempts.*HTTP 502"):
        download_frames([41], out_dir=tmp_path / "out", client=client)
    assert len(file_requests(httpserver)) == 3
    assert no_partial_files(tmp_path / "out")


def test_truncated_body_is_rejected_and_nothing_left(httpserver, client, tmp_path):
    body = fits_body(5, 8640)
    record = frame_json(httpserver, 51, body)
    httpserver.expect_request("/frames/51/").respond_with_json(record)

    def truncated(request: Request) -> Response:
        response = Response(body[:3000], content_type="application/octet-stream")
        response.headers["Content-Length"] = str(len(body))  # promises more than it sends
        return response

    httpserver.expect_request("/files/51.fits.fz").respond_with_handler(truncated)
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"frame 51 .*truncated"):
        download_frames([51], out_dir=out, client=client)
    assert len(file_requests(httpserver)) == 3  # retried: truncation is a network failure
    assert no_partial_files(out)


def test_size_from_record_catches_short_file(httpserver, client, tmp_path):
    """A mirror that gives sizes: a body shorter than the size is refused."""
    body = fits_body(6)
    record = frame_json(httpserver, 61, body)
    record["version_set"][0]["size"] = len(body) + 100
    httpserver.expect_request("/frames/61/").respond_with_json(record)
    httpserver.expect_request("/files/61.fits.fz").respond_with_data(body)
    with pytest.raises(ArchiveError, match=rf"got {len(body)} of {len(body) + 100} bytes"):
        download_frames([61], out_dir=tmp_path, client=client)
    assert no_partial_files(tmp_path)


def test_wrong_md5_is_rejected_and_nothing_left(httpserver, client, tmp_path):
    body = fits_body(7)
    serve_frame(httpserver, 71, body, md5sum=md5(b"something else"))
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"frame 71 .*checksum mismatch.*nothing written"):
        download_frames([71], out_dir=out, client=client)
    assert no_partial_files(out)
    assert not (out / archive.INDEX_NAME).exists()


def test_an_html_page_instead_of_a_file_is_not_written(httpserver, client, tmp_path):
    body = fits_body(8)
    record = frame_json(httpserver, 81, body, md5sum="")
    httpserver.expect_request("/frames/81/").respond_with_json(record)
    httpserver.expect_request("/files/81.fits.fz").respond_with_data(
        "<html>log in</html>", content_type="text/html")
    with pytest.raises(ArchiveError, match="frame 81 .*text/html, not a FITS file"):
        download_frames([81], out_dir=tmp_path, client=client)
    httpserver.clear()
    record = frame_json(httpserver, 82, body, md5sum="")
    httpserver.expect_request("/frames/82/").respond_with_json(record)
    httpserver.expect_request("/files/82.fits.fz").respond_with_data(
        b"<?xml version='1.0'?><Error>AccessDenied</Error>", content_type="binary/octet-stream")
    with pytest.raises(ArchiveError, match="frame 82 .*not a FITS file"):
        download_frames([82], out_dir=tmp_path, client=client)
    assert no_partial_files(tmp_path)


@pytest.mark.parametrize("bad", [
    "../../evil.fits", "/etc/evil.fits", "..\\..\\evil.fits", "C:\\evil.fits", "sub/evil.fits",
    ".hidden.fits", "evil.sh", "ev il.fits", "evil.fits;rm", "", "..",
])
def test_unsafe_filenames_are_refused(httpserver, client, tmp_path, bad):
    body = fits_body(9)
    serve_frame(httpserver, 91, body, filename=bad)
    work = tmp_path / "a" / "b"
    out = work / "out"
    with pytest.raises(ArchiveError, match="frame 91: refused|frame 91: the archive gave no"):
        download_frames([91], out_dir=out, client=client)
    assert file_requests(httpserver) == []  # refused before any download
    assert not list(tmp_path.rglob("*evil*"))
    assert no_partial_files(out)


def test_safe_filename_accepts_lco_names():
    for name in ("ogg2m001-ep02-20210506-0067-e91.fits.fz", "coj1m011-fl08-20151216-0049-b00.fits",
                 "tfn0m414-kb99-20200101-0001-e91.fits.gz", "a+b_c.fz"):
        assert safe_filename(name) == name


def test_401_without_and_with_token(httpserver, tmp_path, monkeypatch):
    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    httpserver.expect_request("/frames/101/").respond_with_json(
        {"detail": "Authentication credentials were not provided."}, status=401)
    anonymous = ArchiveClient(url_for(httpserver, "/"), timeout=5, retries=2, backoff=0.01)
    with pytest.raises(ArchiveError, match="frame 101: HTTP 401.*set LCO_ARCHIVE_TOKEN") as err:
        download_frames([101], out_dir=tmp_path, client=anonymous)
    assert err.value.status == 401 and err.value.frame_id == 101
    assert len(httpserver.log) == 1  # not retried
    assert httpserver.log[0][0].headers.get("Authorization") is None

    httpserver.clear()
    httpserver.expect_request("/frames/101/").respond_with_json(
        {"detail": f"Invalid token {TOKEN}."}, status=401)  # even if the server echoes it
    authed = ArchiveClient(url_for(httpserver, "/"), token=TOKEN, timeout=5, retries=2,
                           backoff=0.01)
    with pytest.raises(ArchiveError, match="frame 101: HTTP 401.*token was rejected") as err:
        download_frames([101], out_dir=tmp_path, client=authed)
    assert TOKEN not in str(err.value)
    assert httpserver.log[0][0].headers.get("Authorization") == f"Token {TOKEN}"


@pytest.mark.parametrize("status, match", [
    (403, r"frame 5: HTTP 403 Forbidden \(proprietary data needs an API token"),
    (404, r"frame 5: HTTP 404 Not Found .*no such frame, or it is proprietary"),
    (400, r"frame 5: HTTP 400"),
])
def test_client_errors_name_the_frame(httpserver, client, status, match):
    httpserver.expect_request("/frames/5/").respond_with_data("no", status=status)
    with pytest.raises(ArchiveError, match=match):
        client.get_frame(5)
    assert len(httpserver.log) == 1


def test_token_is_sent_to_the_archive_only(httpserver, tmp_path):
    """The download link on another origin (a storage host) never gets the token."""
    body = fits_body(10)
    record = frame_json(httpserver, 111, body, host="localhost")  # same server, other origin
    httpserver.expect_request("/frames/111/").respond_with_json(record)
    httpserver.expect_request("/files/111.fits.fz").respond_with_data(body)
    client = ArchiveClient(url_for(httpserver, "/"), token=TOKEN, timeout=5, retries=0)
    download_frames([111], out_dir=tmp_path, client=client)
    auth = {req.path: req.headers.get("Authorization") for req, _ in httpserver.log}
    assert auth == {"/frames/111/": f"Token {TOKEN}", "/files/111.fits.fz": None}


def test_token_never_in_logs_or_written_files(httpserver, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setenv("LCO_ARCHIVE_TOKEN", TOKEN)
    body = fits_body(12)
    record = frame_json(httpserver, 121, body)
    httpserver.expect_ordered_request("/frames/121/").respond_with_data("busy", status=503)
    httpserver.expect_ordered_request("/frames/121/").respond_with_json(record)
    httpserver.expect_ordered_request("/files/121.fits.fz").respond_with_data(body)
    httpserver.expect_request("/frames/122/").respond_with_data(
        f"bad token {TOKEN}", status=500)
    httpserver.expect_request("/frames/123/").respond_with_json(
        {"detail": f"Invalid token {TOKEN}"}, status=401)
    out = tmp_path / "out"
    messages = []
    with caplog.at_level(logging.DEBUG):
        client = ArchiveClient(url_for(httpserver, "/"), timeout=5, retries=1, backoff=0.01)
        messages.append(repr(client))
        download_frames([121], out_dir=out, client=client)
        for frame_id in (122, 123):
            with pytest.raises(ArchiveError) as err:
                download_frames([frame_id], out_dir=out, client=client)
            messages.append(str(err.value))
        # And through the CLI.
        from click.testing import CliRunner

        from daskstack.cli import main

        result = CliRunner().invoke(main, ["download", "121", "123", "--out", str(out),
                                           "--archive-url", url_for(httpserver, "/"),
                                           "--retries", "0"])
        messages.append(result.output)
    assert any(req.headers.get("Authorization") == f"Token {TOKEN}" for req, _ in httpserver.log)
    assert result.exit_code != 0
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, *messages):
        assert TOKEN not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path


# -- command line -------------------------------------------------------------------------


def test_cli_download(httpserver, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from daskstack.cli import main

    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    body = fits_body(13)
    serve_frame(httpserver, 131, body)
    records = [frame_json(httpserver, 131, body)]
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, seen))
    monkeypatch.setenv("DASKSTACK_LCO_ARCHIVE_URL", url_for(httpserver, "/"))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["download", "131", "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert str(out / "ogg2m001-ep02-20210506-0131-e91.fits.fz") in result.output
    result = runner.invoke(main, ["download", "--out", str(out), "--target", "M 66",
                                  "--rlevel", "91", "--filter", "rp", "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert "1 already present" in result.output
    assert seen[-1]["target_name"] == "M 66" and seen[-1]["reduction_level"] == "91"
    result = runner.invoke(main, ["download", "--out", str(out), "--target", "M 66",
                                  "--dry-run"])
    assert result.exit_code == 0 and "131" in result.output

    result = runner.invoke(main, ["download", "--out", str(out)])
    assert result.exit_code != 0 and "frame ids or at least one query option" in result.output
    httpserver.expect_request("/frames/999/").respond_with_data("", status=404)
    result = runner.invoke(main, ["download", "999", "--out", str(out)])
    assert result.exit_code == 4 and "frame 999: HTTP 404" in result.output  # nothing usable
    result = runner.invoke(main, ["download", "--help"])
    assert result.exit_code == 0
    for option in ("--target", "--ra", "--dec", "--radius", "--start", "--end", "--filter",
                   "--site", "--telescope", "--instrument", "--rlevel", "--proposal",
                   "--obstype", "--limit", "--archive-url", "--token-env", "--workers"):
        assert option in result.output


# -- the real archive ---------------------------------------------------------------------


@pytest.mark.remote_data
def test_real_archive_frame_915222(tmp_path, monkeypatch):
    monkeypatch.delenv("DASKSTACK_LCO_ARCHIVE_URL", raising=False)
    results: list = []
    paths = download_frames([915222], out_dir=tmp_path, results=results, retries=2)
    (path,) = paths
    assert path.exists() and path.name.endswith((".fits.fz", ".fits"))
    assert results[0].status == "downloaded" and len(results[0].md5) == 32  # verified
    from daskstack.frames import read_meta

    meta = read_meta(path)
    assert meta.shape[0] > 100 and meta.shape[1] > 100
    again: list = []
    download_frames([915222], out_dir=tmp_path, results=again)
    assert again[0].status == "present"


# -- each record judged alone -------------------------------------------------------------


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def outcomes(out: Path) -> dict[int, tuple[str, str]]:
    """``{frame_id: (status, reason)}`` from ``<out>/lco-download.ecsv``."""
    from astropy.table import Table

    table = Table.read(out / archive.OUTCOMES_NAME, format="ascii.ecsv")
    return {int(row["frame_id"]): (str(row["status"]), str(row["reason"])) for row in table}


def test_standin_archive_with_an_evil_name_downloads_the_good_frames(httpserver, tmp_path,
                                                                      monkeypatch):
    """The issue's case: one record named ``../../evil.fits.fz`` among good ones."""
    from click.testing import CliRunner

    from daskstack.cli import main

    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    bodies = {201: fits_body(21), 202: fits_body(22), 203: fits_body(23)}
    serve_frame(httpserver, 201, bodies[201])
    serve_frame(httpserver, 202, bodies[202], filename="../../evil.fits.fz")
    serve_frame(httpserver, 203, bodies[203])
    out = tmp_path / "a" / "b" / "out"
    result = CliRunner().invoke(main, ["download", "201", "202", "203", "--out", str(out),
                                       "--archive-url", url_for(httpserver, "/"),
                                       "--retries", "0"])
    assert result.exit_code == 3, result.output  # partial
    assert ("FAILED frame 202: refused unsafe file name '../../evil.fits.fz'"
            in result.output)
    assert "report the record to the archive's maintainers" in result.output  # what to do
    assert "2 downloaded, 0 already present, 1 failed" in result.output
    good = {201: out / "ogg2m001-ep02-20210506-0201-e91.fits.fz",
            203: out / "ogg2m001-ep02-20210506-0203-e91.fits.fz"}
    for frame_id, path in good.items():
        assert path.read_bytes() == bodies[frame_id]
        assert str(path) in result.output
    assert sorted(file_requests(httpserver)) == ["/files/201.fits.fz", "/files/203.fits.fz"]
    # Nothing outside the output directory, nothing but the frames and the records inside.
    assert all_files(tmp_path) == sorted([*good.values(), out / archive.INDEX_NAME,
                                          out / archive.OUTCOMES_NAME])
    assert set(read_index(out)) == {201, 203}
    record = outcomes(out)
    assert {k: v[0] for k, v in record.items()} == {201: "downloaded", 202: "failed",
                                                    203: "downloaded"}
    assert "../../evil.fits.fz" in record[202][1]


def _unsafe_name(server, frame_id, body):
    serve_frame(server, frame_id, body, filename="../../evil.fits.fz")


def _missing_url(server, frame_id, body):
    record = frame_json(server, frame_id, body)
    record["url"] = None
    record["version_set"][0]["url"] = None
    server.expect_request(f"/frames/{frame_id}/").respond_with_json(record)


def _file_404(server, frame_id, body):
    record = frame_json(server, frame_id, body)
    server.expect_request(f"/frames/{frame_id}/").respond_with_json(record)
    server.expect_request(f"/files/{frame_id}.fits.fz").respond_with_data("gone", status=404)


def _wrong_md5(server, frame_id, body):
    serve_frame(server, frame_id, body, md5sum=md5(b"another file"))


def _truncated(server, frame_id, body):
    record = frame_json(server, frame_id, body)
    server.expect_request(f"/frames/{frame_id}/").respond_with_json(record)

    def handler(request: Request) -> Response:
        response = Response(body[: len(body) // 2], content_type="application/octet-stream")
        response.headers["Content-Length"] = str(len(body))  # promises more than it sends
        return response

    server.expect_request(f"/files/{frame_id}.fits.fz").respond_with_handler(handler)


NAME = r"ogg2m001-ep02-20210506-0302-e91\.fits\.fz"


@pytest.mark.parametrize("serve_bad, reason", [
    (_unsafe_name, r"^frame 302: refused unsafe file name '\.\./\.\./evil\.fits\.fz'.*"
                   r"report the record to the archive's maintainers"),
    (_missing_url, rf"^frame 302 \({NAME}\): the archive's record has no download 'url'.*"
                   r"try again later, or leave this frame out"),
    (_file_404, rf"^frame 302 \({NAME}\): HTTP 404 Not Found .*download link is gone or "
                r"expired: run again for a fresh link"),
    (_wrong_md5, rf"^frame 302 \({NAME}\): checksum mismatch.*nothing written; run again"),
    (_truncated, rf"^frame 302 \({NAME}\): download failed after 3 attempts \(truncated "
                 r"download: .*\); nothing written; run again later"),
], ids=["unsafe-name", "missing-url", "404", "wrong-md5", "truncated"])
def test_one_bad_record_fails_only_its_frame(httpserver, client, tmp_path, serve_bad, reason):
    bodies = {301: fits_body(31, 5760), 302: fits_body(32, 5760), 303: fits_body(33, 5760)}
    serve_frame(httpserver, 301, bodies[301])
    serve_bad(httpserver, 302, bodies[302])
    serve_frame(httpserver, 303, bodies[303])
    out = tmp_path / "x" / "out"
    results: list = []
    paths = download_frames([301, 302, 303], out_dir=out, client=client, results=results,
                            raise_errors=False)
    assert [r.status for r in results] == ["downloaded", "failed", "downloaded"]
    assert [p.read_bytes() for p in paths] == [bodies[301], bodies[303]]
    failed = results[1]
    assert failed.frame_id == 302 and failed.path is None
    assert re.search(reason, failed.error), failed.error
    # Only the good frames and the two records, in the output directory, nothing else.
    assert all_files(tmp_path) == sorted([*paths, out / archive.INDEX_NAME,
                                          out / archive.OUTCOMES_NAME])
    assert set(read_index(out)) == {301, 303}
    assert outcomes(out)[302] == ("failed", failed.error)
    # By default (the library call) the failure is raised, after the others are in.
    with pytest.raises(ArchiveError, match=reason) as err:
        download_frames([301, 302, 303], out_dir=out, client=client)
    assert err.value.frame_id == 302
    assert all_files(tmp_path) == sorted([*paths, out / archive.INDEX_NAME,
                                          out / archive.OUTCOMES_NAME])


def test_a_bad_record_in_a_query_page_fails_only_its_frame(httpserver, client, tmp_path):
    bodies = [fits_body(40 + i) for i in range(4)]
    records = [frame_json(httpserver, 4100 + i, b) for i, b in enumerate(bodies)]
    records[1]["filename"] = "/etc/evil.fits"
    records[2]["url"] = records[2]["version_set"][0]["url"] = None
    for i, body in enumerate(bodies):
        httpserver.expect_request(f"/files/{4100 + i}.fits.fz").respond_with_data(body)
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, []))
    client.page_size = 2
    results: list = []
    paths = download_frames(query={"target": "M 66"}, out_dir=tmp_path, client=client,
                            results=results, raise_errors=False)
    assert [p.read_bytes() for p in paths] == [bodies[0], bodies[3]]
    assert [(r.frame_id, r.status) for r in results] == [
        (4100, "downloaded"), (4103, "downloaded"), (4101, "failed"), (4102, "failed")]
    assert "refused unsafe file name '/etc/evil.fits'" in results[2].error
    assert "no download 'url'" in results[3].error
    assert sorted(file_requests(httpserver)) == ["/files/4100.fits.fz", "/files/4103.fits.fz"]
    assert not list(tmp_path.rglob("*evil*"))
    # Without a list for them, a bad record in a query fails the query (the old contract).
    with pytest.raises(ArchiveError, match="frame 4101: refused"):
        client.query_frames(target="M 66")


def test_two_records_with_one_file_name(httpserver, client, tmp_path):
    """The second record that would overwrite the first one's file fails alone."""
    serve_frame(httpserver, 501, fits_body(51), filename="same-e91.fits.fz")
    serve_frame(httpserver, 502, fits_body(52), filename="same-e91.fits.fz")
    serve_frame(httpserver, 503, fits_body(53))
    results: list = []
    download_frames([501, 502, 503], out_dir=tmp_path, client=client, results=results,
                    raise_errors=False)
    assert [r.status for r in results] == ["downloaded", "failed", "downloaded"]
    assert "frame 502 (same-e91.fits.fz): frame 501 has the same file name" in results[1].error
    assert (tmp_path / "same-e91.fits.fz").read_bytes() == fits_body(51)


def test_download_exit_codes(httpserver, tmp_path, monkeypatch):
    """0 all done, 3 partial, 4 nothing usable, 2 bad usage; as every other command."""
    from click.testing import CliRunner

    from daskstack._exitcodes import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
    from daskstack.cli import main

    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    monkeypatch.setenv("DASKSTACK_LCO_ARCHIVE_URL", url_for(httpserver, "/"))
    serve_frame(httpserver, 601, fits_body(61))
    serve_frame(httpserver, 602, fits_body(62), md5sum=md5(b"other"))
    httpserver.expect_request("/frames/603/").respond_with_data("", status=404)
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler([], []))
    runner = CliRunner()

    def code(*args, out="out"):
        result = runner.invoke(main, ["download", *args, "--out", str(tmp_path / out),
                                      "--retries", "0"])
        return result.exit_code, result.output

    assert code("601")[0] == EXIT_OK
    assert code("601")[0] == EXIT_OK  # already present: still all done
    partial, output = code("601", "602", "603")
    assert partial == EXIT_PARTIAL
    assert "FAILED frame 602 (" in output and "checksum mismatch" in output
    assert "FAILED frame 603: HTTP 404" in output
    assert "0 downloaded, 1 already present, 2 failed" in output
    assert code("602", "603", out="none")[0] == EXIT_FAILED
    assert not list((tmp_path / "none").glob("*.fz"))
    nothing, output = code("--target", "nothing here", out="none")
    assert nothing == EXIT_FAILED and "no frame matched" in output
    assert code("--dry-run", "601", "603")[0] == EXIT_PARTIAL
    assert code("--dry-run", "601")[0] == EXIT_OK
    for usage in (["--start", "yesterday"], ["601", "--archive-url", "ftp://x"], [],
                  ["0"], ["601", "--token-file", str(tmp_path / "no-such-file")]):
        assert code(*usage, out="usage")[0] == EXIT_USAGE, usage
    assert not (tmp_path / "usage").exists()  # bad usage: nothing was started


def test_run_with_some_bad_records_runs_the_good_frames(sim_field, dask_client, httpserver,
                                                         tmp_path, monkeypatch):
    """`run --lco-frames` with two bad records: the good frames are downloaded and run,
    the bad ones reported with their reason, exit 3; all bad: exit 4."""
    from astropy.table import Table
    from click.testing import CliRunner

    from daskstack._exitcodes import EXIT_FAILED, EXIT_PARTIAL
    from daskstack.cli import main

    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    good = sim_field.frames[:2]
    for frame_id, path in zip((701, 702), good, strict=True):
        serve_frame(httpserver, frame_id, path.read_bytes(), filename=path.name,
                    file_path=f"/files/{path.name}")
    serve_frame(httpserver, 703, fits_body(73), filename="../../evil.fits.fz")
    serve_frame(httpserver, 704, fits_body(74), md5sum=md5(b"other"))
    out = tmp_path / "run"
    common = ["--catalog", str(sim_field.catalog), "--archive-url", url_for(httpserver, "/"),
              "--scheduler", dask_client.scheduler.address]
    args = ["run", "--out", str(out), *common]
    for frame_id in (701, 702, 703, 704):
        args += ["--lco-frames", str(frame_id)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == EXIT_PARTIAL, result.output[-3000:]
    assert "FAILED frame 703: refused unsafe file name '../../evil.fits.fz'" in result.output
    assert "FAILED frame 704 (" in result.output and "checksum mismatch" in result.output
    assert "archive: 2 frames not downloaded" in result.output
    manifest = Table.read(out / "manifest.ecsv")
    assert sorted(manifest["name"]) == sorted(p.name.replace(".fits.fz", "") for p in good)
    assert set(manifest["status"]) == {"ok"}
    assert {k: v[0] for k, v in outcomes(out / "frames").items()} == {
        701: "downloaded", 702: "downloaded", 703: "failed", 704: "failed"}
    assert not list(tmp_path.rglob("*evil*"))
    assert sorted(p.name for p in (out / "frames").glob("*.fits.fz")) == sorted(
        p.name for p in good)

    none = tmp_path / "none"
    result = CliRunner().invoke(main, ["run", "--out", str(none), *common, "--lco-frames",
                                       "703", "--lco-frames", "704"], catch_exceptions=False)
    assert result.exit_code == EXIT_FAILED, result.output[-3000:]
    assert "no frame could be downloaded (2 failed" in result.output
    assert not (none / "manifest.ecsv").exists()
