"""One base for the package's errors; each keeps the built-in base callers may catch."""

import pytest

import daskstack
from daskstack import _cluster as cluster
from daskstack import _rundir as rundir
from daskstack import archive, catalogs, config, frames, grid, match, store
from daskstack.errors import DaskstackError


@pytest.mark.parametrize("error, builtin", [
    (archive.ArchiveError, Exception),
    (catalogs.CatalogError, RuntimeError),
    (cluster.ClusterError, RuntimeError),
    (config.SettingsError, ValueError),
    (frames.FrameError, ValueError),
    (grid.GridError, ValueError),
    (match.MatchError, RuntimeError),
    (rundir.RunError, RuntimeError),
    (store.StoreError, ValueError),
])
def test_every_error_is_a_daskstack_error(error, builtin):
    assert issubclass(error, DaskstackError) and issubclass(error, builtin)
    assert daskstack.DaskstackError is DaskstackError


def test_catching_the_base_catches_a_bad_option():
    settings = daskstack.Settings()
    settings = settings.replace("combine", method="average")
    with pytest.raises(DaskstackError, match="combine.method = 'average' is not one of"):
        settings.validate()
