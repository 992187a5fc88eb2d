"""Quality control (issue 21): excluding frames and quality cuts at combine time, outliers
found per group of comparable frames, and the suggested exclusions the report writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

from daskstack import qa
from daskstack._pipeline import combine_store_path, run
from daskstack._rundir import read_manifest
from daskstack.config import SelectSettings, Settings

# frame index -> how it is degraded (simulate_field's frame_overrides), and the QA metric
# (label in find_outliers' reasons) a person would blame
DEGRADED = {
    2: ({"fwhm_px": 7.0}, "FWHM"),  # bad seeing
    5: ({"transparency": 0.3, "sky_factor": 3.0}, "flux ratio"),  # clouds
    8: ({"psf": "trailed"}, "elongation"),  # a trailed frame (a tracking jump)
    # clouds: a zero point 0.75 mag low (transparency 0.7, 0.3 mag, is within 5 robust
    # sigma of a night whose transparency wanders between 0.85 and 1: measured, not flagged)
    7: ({"transparency": 0.5}, "zero point"),
}


@pytest.fixture(scope="module")
def degraded_field(tmp_path_factory):
    from daskstack.simulate import simulate_field

    # stars with colours: the catalog has an r band, so every frame gets a zero point
    return simulate_field(tmp_path_factory.mktemp("qc-sim"), n_frames=10, shape=(512, 512),
                          filters=("rp",), seed=5, colours=True,
                          frame_overrides={i: o for i, (o, _) in DEGRADED.items()})


@pytest.fixture(scope="module")
def degraded_run(degraded_field, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("qc-run")
    result = run([str(p) for p in degraded_field.frames], str(degraded_field.catalog), out,
                 client=dask_client)
    assert result.n_combined == 10
    return out, result


def _names(field) -> list[str]:
    return [Path(p).name.removesuffix(".fits.fz") for p in field.frames]


def _mtimes(run_dir: Path) -> dict[str, int]:
    """Modification times of everything solving and registering writes: the .wcs files
    and every chunk of the store (not its metadata, which a combine may update)."""
    files = list(run_dir.glob("*.wcs")) + [
        p for p in (run_dir / "store.zarr").rglob("*") if p.is_file() and "/c/" in str(p)
        and "coadd" not in p.relative_to(run_dir).parts[1]]
    assert files
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_cuts_and_names_pure():
    rows = {
        "a": {"fwhm_px": 3.0, "rms_arcsec": 0.1, "n_matches": 40, "background": 100.0},
        "b": {"fwhm_px": 6.5, "rms_arcsec": 0.1, "n_matches": 40, "background": 100.0},
        "c": {"fwhm_px": 3.0, "rms_arcsec": 0.9, "n_matches": 9, "background": 900.0},
        "d": {"fwhm_px": np.nan, "rms_arcsec": np.nan, "n_matches": 0, "background": 100.0},
    }
    select = SelectSettings(max_fwhm_px=5.0, min_matches=10, min_zp=20.0)
    out = qa.excluded_frames(rows, select, {"a.fits.fz": "--exclude-file x.txt"})
    assert out["a"] == "excluded by --exclude-file x.txt"
    assert out["b"].startswith("excluded by --max-fwhm 5: fwhm_px 6.5")
    assert out["c"].startswith("excluded by --min-matches 10")
    # no FWHM, never matched (header WCS), no zero point: no cut applies
    assert "d" not in out
    assert not qa.has_zero_points(rows)
    assert qa.excluded_frames(rows, SelectSettings()) == {}


def test_exclude_file_format_round_trip():
    text = qa.format_name_list({"x-e91": "FWHM 7 px", "y-e91": "sky high"}, "heading\nmore")
    assert qa.parse_name_list(text) == ["x-e91", "y-e91"]
    assert qa.parse_name_list("# only a comment\n\n  z-e91.fits.fz  # why\n") == ["z-e91"]


def test_select_settings_checked():
    from daskstack.config import SettingsError

    with pytest.raises(SettingsError, match="select.max_fwhm_px"):
        Settings.from_dict({"select": {"max_fwhm_px": -1}}).validate()
    with pytest.raises(SettingsError, match="select.min_zp"):
        Settings.from_dict({"select": {"min_zp": 25, "max_zp": 24}}).validate()
    s = Settings.from_dict({"select": {"exclude": "one-e91"}}).validate()
    assert s.select.exclude == ("one-e91",)


def test_exclusion_recombines_without_solving_or_registering(degraded_field, degraded_run,
                                                             dask_client):
    out, _ = degraded_run
    names = _names(degraded_field)
    before = _mtimes(out)
    settings = Settings().replace("select", exclude=(names[1],), max_fwhm_px=6.5)
    # the same run with combine-time settings changed: no --overwrite, a resume
    result = run([str(p) for p in degraded_field.frames], str(degraded_field.catalog), out,
                 settings, client=dask_client)
    assert _mtimes(out) == before
    table = read_manifest(out / "manifest.ecsv")
    status = dict(zip(table["name"], table["status"], strict=True))
    reason = dict(zip(table["name"], table["reason"], strict=True))
    excluded = sorted(n for n, s in status.items() if s == "excluded")
    fwhm = dict(zip(table["name"], table["fwhm_px"], strict=True))
    expected = sorted({names[1]} | {n for n, f in fwhm.items() if f > 6.5})
    assert excluded == expected and len(excluded) >= 2
    assert reason[names[1]] == "excluded by --exclude"
    assert all("--max-fwhm 6.5" in reason[n] for n in excluded if n != names[1])
    header = fits.getheader(out / "coadd_rp.fits")
    assert header["NCOMBINE"] == 10 - len(excluded)
    assert header["NEXCL"] == len(excluded)
    assert sorted(header[f"EXCL{i:03d}"] for i in range(1, len(excluded) + 1)) == excluded
    imcmb = {header[k] for k in header if k.startswith("IMCMB")}
    assert not imcmb & set(excluded)
    assert result.exit_code == 0 and result.n_combined == 10 - len(excluded)

    # the combine command takes every frame back when no rule leaves one out
    runner = CliRunner()
    res = runner.invoke(__import__("daskstack.cli", fromlist=["main"]).main, [
        "combine", str(out / "store.zarr"), "--scheduler", dask_client.scheduler.address,
        "-q"])
    assert res.exit_code == 0, res.output
    assert set(read_manifest(out / "manifest.ecsv")["status"]) == {"ok"}
    assert fits.getheader(out / "coadd_rp.fits")["NCOMBINE"] == 10
    assert _mtimes(out) == before


def test_zero_point_cuts_leave_out_the_cloudy_frames(degraded_field, degraded_run,
                                                    dask_client):
    """Every frame has a zero point (photcal); --min-zp 0.2 mag below the median leaves
    out the two cloudy frames (transparency 0.3 and 0.5), with the rule as reason."""
    out, _ = degraded_run
    table = read_manifest(out / "manifest.ecsv")
    assert np.all(np.isfinite(table["zp"])) and np.all(table["n_zp"] >= 3)
    limit = float(np.median(table["zp"])) - 0.2
    settings = Settings().replace("select", min_zp=limit)
    combine_store_path(out / "store.zarr", out, settings, client=dask_client)
    table = read_manifest(out / "manifest.ecsv")
    names = _names(degraded_field)
    excluded = {str(n): str(r) for n, s, r in zip(table["name"], table["status"],
                                                  table["reason"], strict=True)
                if s == "excluded"}
    assert sorted(excluded) == sorted([names[5], names[7]])
    assert all(r.startswith(f"excluded by --min-zp {limit:g}: zp ") for r in excluded.values())
    assert fits.getheader(out / "coadd_rp.fits")["NEXCL"] == 2


def test_missing_exclude_file_is_refused_before_work(degraded_field, tmp_path):
    from daskstack.errors import RunError

    settings = Settings().replace("select", exclude_file=str(tmp_path / "absent.txt"))
    with pytest.raises(RunError, match="absent.txt"):
        run([str(p) for p in degraded_field.frames], str(degraded_field.catalog),
            tmp_path / "out", settings)


# --------------------------------------------------------------------------------------
# Outliers, the way a person would find them; the report's suggested exclusions
# --------------------------------------------------------------------------------------
def _row(name, filt="rp", night="20230701", telescope="1m0-09", **qa_values):
    values = {"fwhm_px": 3.0, "elongation": 1.1, "background": 150.0, "flux_ratio": 60.0,
              "exptime": 60.0, "rms_arcsec": 0.1, "n_matches": 100}
    values.update(qa_values)
    return {"name": f"{telescope}-fa15-{night}-{name}-e91", "filter": filt,
            "telescope": telescope, "instrument": "fa15", **values}


def test_outliers_within_groups_of_comparable_frames():
    rng = np.random.default_rng(2)
    rows = {}
    # night 1 has good seeing, night 2 poor seeing everywhere: each night judged alone
    for night, fwhm in (("20230701", 3.0), ("20230702", 5.5)):
        for i in range(8):
            row = _row(f"{i:04d}", night=night, fwhm_px=rng.normal(fwhm, 0.1),
                       background=rng.normal(150, 5))
            rows[row["name"]] = row
    bad = _row("0099", night="20230701", fwhm_px=6.0)
    rows[bad["name"]] = bad
    # a shallow band (another filter) has a brighter sky: not an outlier of the rp frames
    for i in range(5):
        row = _row(f"{i + 20:04d}", filt="zs", background=rng.normal(900, 20))
        rows[row["name"]] = row
    outliers = qa.find_outliers(rows)
    assert set(outliers) == {bad["name"]}
    assert outliers[bad["name"]][0].startswith("FWHM 6")
    groups = qa.group_statistics(rows)
    assert set(groups) == {"rp / 1m0-09-fa15 / 20230701", "rp / 1m0-09-fa15 / 20230702",
                           "zs / 1m0-09-fa15 / 20230701"}
    # a group too small for statistics flags nothing
    assert qa.find_outliers({k: rows[k] for k in list(rows)[:3]}) == {}
    # zero points, where frames have them, are judged on both sides
    zp_rows = {k: dict(v, zp=23.5 + 0.01 * j) for j, (k, v) in enumerate(list(rows.items())[:8])}
    wrong = next(iter(zp_rows))
    zp_rows[wrong]["zp"] = 22.9
    assert "zero point" in " ".join(qa.find_outliers(zp_rows)[wrong])


@pytest.fixture(scope="module")
def degraded_report(degraded_run, dask_client):
    from daskstack._pipeline import make_report

    out, _ = degraded_run
    return out, make_report(out, client=dask_client)


def test_degraded_frames_flagged_with_their_reason(degraded_field, degraded_report):
    out, index = degraded_report
    names = _names(degraded_field)
    suggested = out / "report" / "suggested-exclude.txt"
    listed = qa.parse_name_list(suggested.read_text())
    assert sorted(listed) == sorted(names[i] for i in DEGRADED)  # no good frame flagged
    lines = {line.split()[0]: line for line in suggested.read_text().splitlines()
             if line and not line.startswith("#")}
    for i, (_, label) in DEGRADED.items():
        assert f"# {label} " in lines[names[i]] or f"; {label} " in lines[names[i]], \
            lines[names[i]]
    # the page lists the flagged frames first, each with why, and every frame once
    text = index.read_text()
    rows = re.findall(r'<tr id="frame-.*?</tr>', text)
    assert len(rows) == 10
    first = [r.split('data-name="')[1].split('"')[0] for r in rows[:len(DEGRADED)]]
    assert sorted(first) == sorted(listed)
    assert all('class="outlier"' in r and "flagged: " in r for r in rows[:len(DEGRADED)])
    assert text.count('<img class="thumb"') == 10
    # full-size pictures for the flagged frames only
    drawn = {p.name.removesuffix("_sources.png")
             for p in (out / "report" / "frames").glob("*_sources.png")}
    assert drawn == set(listed)


def test_suggested_exclusions_recombine_without_registering(degraded_field, degraded_report,
                                                            dask_client):
    out, _ = degraded_report
    suggested = out / "report" / "suggested-exclude.txt"
    flagged = sorted(qa.parse_name_list(suggested.read_text()))
    before = _mtimes(out)
    runner = CliRunner()
    res = runner.invoke(__import__("daskstack.cli", fromlist=["main"]).main, [
        "combine", str(out / "store.zarr"), "--exclude-file", str(suggested),
        "--scheduler", dask_client.scheduler.address, "-q"])
    assert res.exit_code == 0, res.output
    assert _mtimes(out) == before  # nothing solved or registered again
    table = read_manifest(out / "manifest.ecsv")
    excluded = sorted(str(n) for n, s in zip(table["name"], table["status"], strict=True)
                      if s == "excluded")
    assert excluded == flagged
    assert all(str(r) == "excluded by --exclude-file suggested-exclude.txt"
               for r, s in zip(table["reason"], table["status"], strict=True)
               if s == "excluded")
    header = fits.getheader(out / "coadd_rp.fits")
    assert header["NCOMBINE"] == 10 - len(flagged) and header["NEXCL"] == len(flagged)
    # the same run command with that file: a resume, nothing recomputed, same exclusions
    settings = Settings().replace("select", exclude_file=str(suggested))
    result = run([str(p) for p in degraded_field.frames], str(degraded_field.catalog), out,
                 settings, client=dask_client)
    assert _mtimes(out) == before
    assert sorted(r.name for r in result.frames if r.status == "excluded") == flagged


def test_real_frames_groups_follow_filter_and_night(lco_frames, dask_client, tmp_path):
    """The twelve PDS 110 frames (one night, one telescope, four filters; the u' headers
    say their WCS failed): every frame in the table, one group per filter of that night."""
    from daskstack._pipeline import make_report

    out = tmp_path / "pds110"
    result = run([str(p) for p in lco_frames], "", out, client=dask_client)
    assert result.n_combined == 9 and result.n_failed == 3  # u': WCSERR = 4
    index = make_report(out, client=dask_client)
    text = index.read_text()
    rows = re.findall(r'<tr id="frame-[^"]*"[^>]*data-name="([^"]+)"', text)
    assert sorted(rows) == sorted(Path(p).name.removesuffix(".fits.fz") for p in lco_frames)
    groups = re.search(r'<p id="groups">[^:]*: ([^<]*)</p>', text).group(1).split("; ")
    table = read_manifest(out / "manifest.ecsv")
    telescope = f"{table['telescope'][0]}-{table['instrument'][0]}"
    assert groups == [f"{f} / {telescope} / 20170815" for f in ("gp", "rp", "up", "zs")]
    # each row names its frame's group, and the failed u' frames come first
    assert all(f"<td>up / {telescope} / 20170815</td>" in row
               for row in re.findall(r'<tr id="frame-[^>]*data-status="failed".*?</tr>', text))
    assert rows[:3] == [n for n, s in zip(table["name"], table["status"], strict=True)
                        if s == "failed"]
