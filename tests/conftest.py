"""Shared fixtures: the real LCO frames in ../shared and small synthetic fields."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LCO_DIR = ROOT.parent / "shared" / "data" / "lco-pds110"


@pytest.fixture(scope="session")
def lco_dir() -> Path:
    """The twelve real LCO frames of PDS 110 and their reference catalog (never copied)."""
    if not (LCO_DIR / "refcat-pds110.ecsv").exists():
        pytest.skip(f"real LCO frames not found at {LCO_DIR} (12 LCO frames of PDS 110 "
                    "from the public repository hposborn/pds110: see README.md, Test data)")
    return LCO_DIR


@pytest.fixture(scope="session")
def lco_frames(lco_dir) -> list[Path]:
    return sorted(lco_dir.glob("*.fits.fz"))


@pytest.fixture(scope="session")
def dask_client():
    """One LocalCluster (2 worker processes) shared by the pipeline tests."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def sim_field(tmp_path_factory):
    """Six small synthetic LCO-like frames in two filters, with known truth."""
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("sim") / "inputs", n_frames=6,
                          shape=(768, 768), filters=("rp", "gp"), seed=11)


@pytest.fixture(scope="session")
def sim_run(sim_field, dask_client, tmp_path_factory):
    """The whole pipeline run once on `sim_field` (default settings)."""
    from daskstack.pipeline import run

    out = tmp_path_factory.mktemp("sim-run")
    return run([str(p) for p in sim_field.frames], str(sim_field.catalog), out,
               client=dask_client)
