"""Catalogs: files with aliases, clear errors, proper motion, Gaia with retries and cache (no network)."""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from daskstack import catalogs
from daskstack.catalogs import (
    CatalogError,
    load_catalog,
    propagate_proper_motion,
    query_gaia,
    reference_catalog,
)
from daskstack.config import CatalogSettings


def test_load_real_refcat(lco_dir):
    cat = load_catalog(lco_dir / "refcat-pds110.ecsv")
    assert len(cat) == 124
    assert cat.colnames == ["ra", "dec", "mag", "pmra", "pmdec", "ref_epoch"]
    assert np.all(np.diff(cat["mag"]) >= 0)
    assert np.all(cat["pmra"] == 0) and np.all(np.isnan(cat["ref_epoch"]))


def test_aliases_csv_and_fits(tmp_path):
    t = Table({"RA": [10.0, 10.1], "DEC": [-5.0, -5.1], "phot_g_mean_mag": [15.0, 12.0],
               "pmRA": [5.0, 0.0], "pmDE": [1.0, 0.0], "ref_epoch": [2016.0, 2016.0]})
    t.write(tmp_path / "c.csv")
    t.rename_column("pmDE", "pmdec")
    t.write(tmp_path / "c.fits")
    for name in ("c.csv", "c.fits"):
        cat = load_catalog(tmp_path / name)
        assert list(cat["mag"]) == [12.0, 15.0]
        assert cat["pmra"][1] == 5.0 and cat["ref_epoch"][1] == 2016.0


def test_missing_columns_named(tmp_path):
    Table({"x": [1.0], "mag": [2.0]}).write(tmp_path / "bad.ecsv")
    with pytest.raises(CatalogError, match=r"bad\.ecsv.*missing column\(s\) ra, dec"):
        load_catalog(tmp_path / "bad.ecsv")
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "none.ecsv")


def test_propagate_proper_motion():
    t = Table({"ra": [80.0, 80.0], "dec": [-1.0, 60.0], "mag": [10.0, 11.0],
               "pmra": [1000.0, 1000.0], "pmdec": [-500.0, 0.0],
               "ref_epoch": [2016.0, np.nan]})
    out = propagate_proper_motion(t, 2026.0)
    c0 = SkyCoord(t["ra"][0], t["dec"][0], unit="deg")
    c1 = SkyCoord(out["ra"][0], out["dec"][0], unit="deg")
    east, north = c0.spherical_offsets_to(c1)
    assert abs(east.arcsec - 10.0) < 1e-3 and abs(north.arcsec + 5.0) < 1e-3
    assert out["ra"][1] == 80.0 and out["dec"][1] == 60.0  # no epoch: not moved
    assert out["ref_epoch"][0] == 2026.0


def _fake_gaia():
    return Table({"ra": [80.0, 80.01, 80.02], "dec": [-1.0, -1.01, -1.02],
                  "phot_g_mean_mag": [12.0, 19.5, 14.0], "pmra": [1.0, 2.0, np.nan],
                  "pmdec": [1.0, 2.0, np.nan], "ref_epoch": [2016.0, 2016.0, 2016.0]})


def test_query_gaia_retries_then_caches(tmp_path, monkeypatch):
    calls = []

    def flaky(center, radius, mag_limit, timeout):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("boom")
        return _fake_gaia()

    monkeypatch.setitem(catalogs._SERVICES, "mast", flaky)
    monkeypatch.setattr(catalogs.time, "sleep", lambda s: None)
    centre = SkyCoord(80.0, -1.0, unit="deg")
    t = query_gaia(centre, 0.3, 19.0, service="mast", retries=4, cache_dir=tmp_path)
    assert len(calls) == 3 and len(t) == 2  # the G=19.5 star is cut
    assert t["pmra"][1] == 0.0 and np.isnan(t["ref_epoch"][1])  # no PM known
    # the same field (rounded centre) again: from the cache, no network
    monkeypatch.setitem(catalogs._SERVICES, "mast", lambda *a: pytest.fail("queried again"))
    t2 = query_gaia(SkyCoord(80.0001, -1.0, unit="deg"), 0.3, 19.0, cache_dir=tmp_path)
    assert len(t2) == 2


def test_query_gaia_gives_up_with_clear_error(monkeypatch):
    def down(*args):
        raise TimeoutError("no route")

    monkeypatch.setitem(catalogs._SERVICES, "tap", down)
    monkeypatch.setattr(catalogs.time, "sleep", lambda s: None)
    with pytest.raises(CatalogError, match=r"via tap failed after 3 attempts.*RA 80\.0000"):
        query_gaia(SkyCoord(80.0, -1.0, unit="deg"), 0.3, service="tap", retries=2)


def test_reference_catalog_entry_point(tmp_path, monkeypatch, lco_dir):
    monkeypatch.setitem(catalogs._SERVICES, "tap", lambda *a: _fake_gaia())
    s = CatalogSettings(cache_dir=str(tmp_path))
    t = reference_catalog("gaia-tap", SkyCoord(80.0, -1.0, unit="deg"), 0.3, s, epoch=2026.0)
    assert len(t) == 2 and t["ref_epoch"][0] == 2026.0
    f = reference_catalog(lco_dir / "refcat-pds110.ecsv", SkyCoord(80.88, -1.17, unit="deg"),
                          0.1, s)
    assert 0 < len(f) < 124
