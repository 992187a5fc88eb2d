"""The ``daskstack`` command: thin; it parses options, builds Settings and calls the API."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="daskstack")
def main():
    """Calibrate, register and co-add telescope frames with Dask."""


if __name__ == "__main__":
    sys.exit(main())
