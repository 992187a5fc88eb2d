"""Catalog sources as one registry: each with its query, bands and epoch; cache and
retries written once around them (no network: the queries are replaced)."""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from daskstack import catalogs
from daskstack.catalogs import (
    SOURCES,
    CatalogError,
    CatalogSource,
    catalog_source,
    reference_catalog,
)
from daskstack.config import CatalogSettings

CENTRE = SkyCoord(150.0, 2.0, unit="deg")


def test_registry_entries_are_complete():
    for name, source in SOURCES.items():
        assert source.name == name
        if source.service is not None:
            assert source.service in catalogs._SERVICES, name
            assert source.bands and source.epoch is not None, name
    assert catalog_source("gaia").service == "mast"
    assert catalog_source("gaia-tap").service == "tap"
    assert catalog_source("some/dir/ref.ecsv") is SOURCES["file"]


def _photometric_rows():
    """Rows as a photometric service returns them: two bands, no proper motions."""
    return Table({"raMean": [150.0, 150.01, 150.02], "decMean": [2.0, 2.01, 2.02],
                  "gMeanPSFMag": [15.0, 14.0, 21.0], "rMeanPSFMag": [14.5, 13.0, 20.5]})


def test_a_new_source_is_one_entry(tmp_path, monkeypatch):
    """A photometric catalog added as a registry entry (and its service query) gets the
    shared retries, cache, band choice and default epoch without other code."""
    calls = []

    def flaky(center, radius_deg, mag_limit, timeout):
        calls.append(radius_deg)
        if len(calls) < 2:
            raise ConnectionError("reset by peer")
        table = _photometric_rows()
        table.rename_columns(["raMean", "decMean"], ["ra", "dec"])
        return table

    monkeypatch.setitem(catalogs._SERVICES, "photo", flaky)
    monkeypatch.setitem(SOURCES, "photo-r", CatalogSource(
        "photo-r", "Photo", "DR2", "photo", (("r", "rMeanPSFMag"), ("g", "gMeanPSFMag")),
        2012.0))
    monkeypatch.setattr(catalogs.time, "sleep", lambda s: None)
    settings = CatalogSettings(cache_dir=str(tmp_path), mag_limit=20.0, retries=2)
    table = reference_catalog("photo-r", CENTRE, 0.2, settings)
    assert len(calls) == 2  # one failure, one retry
    assert list(table["mag"]) == [13.0, 14.5]  # r band, brightest first, r > 20 cut
    assert np.all(table["ref_epoch"] == 2012.0)
    assert table.meta["band"] == "r" and table.meta["source"] == "Photo DR2 (photo)"
    assert [p.name.split("_")[0] for p in tmp_path.glob("*.ecsv")] == ["photo-photo"]
    monkeypatch.setitem(catalogs._SERVICES, "photo", lambda *a: pytest.fail("queried again"))
    again = reference_catalog("photo-r", CENTRE, 0.2, settings)
    assert list(again["mag"]) == [13.0, 14.5]


def test_service_failure_names_the_catalog(monkeypatch):
    def down(*args):
        raise TimeoutError("no route")

    monkeypatch.setitem(catalogs._SERVICES, "photo", down)
    monkeypatch.setitem(SOURCES, "photo-r", CatalogSource(
        "photo-r", "Photo", "DR2", "photo", (("r", "rMeanPSFMag"),), 2012.0))
    with pytest.raises(CatalogError, match=r"^Photo query via photo failed after 1 attempts"):
        reference_catalog("photo-r", CENTRE, 0.2, CatalogSettings(retries=0))
    with pytest.raises(CatalogError, match="a field centre and radius are needed to query Photo"):
        reference_catalog("photo-r")


def test_file_source_keeps_the_field_and_limit(tmp_path):
    rows = _photometric_rows()
    rows.rename_columns(["raMean", "decMean", "rMeanPSFMag"], ["ra", "dec", "mag"])
    rows.write(tmp_path / "ref.ecsv")
    table = reference_catalog(tmp_path / "ref.ecsv", SkyCoord(150.0, 2.0, unit="deg"), 0.02,
                              CatalogSettings(mag_limit=20.0))
    assert list(table["mag"]) == [13.0, 14.5]  # the 20.5 star is beyond the limit
    near = reference_catalog(tmp_path / "ref.ecsv", SkyCoord(150.0, 2.0, unit="deg"), 0.005,
                             CatalogSettings(mag_limit=30.0))
    assert list(near["mag"]) == [14.5]  # only the star within 0.005 deg
