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
        pytest.skip(f"real LCO frames not found at {LCO_DIR}")
    return LCO_DIR


@pytest.fixture(scope="session")
def lco_frames(lco_dir) -> list[Path]:
    return sorted(lco_dir.glob("*.fits.fz"))
