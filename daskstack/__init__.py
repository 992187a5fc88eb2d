"""daskstack: calibrate, register and co-add telescope frames at any scale with Dask."""

__version__ = "0.1.0"
