"""Settings: immutable values, one declaration of every option's vocabulary and default
(read by the validation, the command's choices and its help texts)."""

from __future__ import annotations

import dataclasses
import json
import re

import click
import pytest

from daskstack import cli
from daskstack.catalogs import SOURCES
from daskstack.combine import COMBINE_METHODS
from daskstack.config import Settings, SettingsError, option_choices


def test_settings_are_immutable_and_changes_make_new_objects():
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.combine.method = "median"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.combine = settings.combine
    changed = settings.update({"combine.method": "median", "cluster": {"n_workers": "3"}})
    assert (changed.combine.method, changed.cluster.n_workers) == ("median", 3)
    assert settings == Settings()  # the original is untouched
    replaced = settings.replace("solve", sip_order=3)
    assert replaced.solve.sip_order == 3 and settings.solve.sip_order == 0
    assert replaced.combine is settings.combine  # untouched sections are shared, not copied
    with pytest.raises(SettingsError, match="unknown setting solve.nope"):
        settings.replace("solve", nope=1)
    with pytest.raises(SettingsError, match="cannot be read as int"):
        settings.replace("solve", sip_order="three")


def test_run_leaves_the_callers_settings_unchanged(sim_field, dask_client, tmp_path):
    """The catalog travels as run()'s argument only: run() derives its own Settings (the
    catalog, 'auto' settled), records them in run.json and changes nothing of the caller's."""
    from daskstack._pipeline import run

    settings = Settings().replace("combine", method="mean")
    before = json.dumps(settings.to_dict(), sort_keys=True)
    result = run([str(p) for p in sim_field.frames[:2]], str(sim_field.catalog),
                 tmp_path / "run", settings, client=dask_client)
    assert result.n_solved == 2
    assert json.dumps(settings.to_dict(), sort_keys=True) == before
    assert settings.catalog.source == "gaia" and settings.solve.wcs == "auto"
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert recorded["catalog"]["source"] == str(sim_field.catalog)
    assert recorded["solve"]["wcs"] == "solve"


def _stage_settings_params():
    """(command name, click option, settings key) of every option that sets a setting."""
    return [(name, param, param.settings_key) for name, command in cli.main.commands.items()
            for param in command.params if isinstance(param, cli.SettingsOption)]


def _declared_default(key):
    section, name = key.split(".")
    section_class = {f.name: f.default_factory for f in dataclasses.fields(Settings)}[section]
    return next(f.default for f in dataclasses.fields(section_class) if f.name == name)


def test_every_cli_choice_and_help_default_is_the_settings_declaration():
    params = _stage_settings_params()
    assert {key for _, _, key in params} >= {"solve.wcs", "combine.method", "combine.scale",
                                            "register.order", "cluster.jobqueue"}
    for command, param, key in params:
        where = f"daskstack {command} {param.opts[0]} ({key})"
        choices = option_choices(*key.split("."))
        if choices is not None and key != "combine.method":  # a comma-separated list
            assert isinstance(param.type, click.Choice), where
            assert list(param.type.choices) == [c for c in choices if c], where
        default = _declared_default(key)
        shown = re.findall(r"\[([^\]]*)\]", param.help)  # a default written by hand: two
        if isinstance(default, bool):
            on, _, off = param.opts[0], None, param.secondary_opts[0]
            assert shown == [(on if default else off).lstrip("-")], where
        elif default in ("", None):
            assert not shown, where
        else:
            assert len(shown) == 1, where
            assert type(default)(shown[0]) == default, where
        assert param.default is None, where  # unset options leave the config file's value
    # the vocabularies are the tables': a combine method or catalog service added there is
    # offered by the command without touching it
    combine_help = next(p.help for _, p, k in params if k == "combine.method")
    assert all(method in combine_help for method in COMBINE_METHODS)
    catalog_help = next(p.help for p in cli.main.commands["run"].params if p.name == "catalog")
    assert all(f"'{name}'" in catalog_help for name, s in SOURCES.items() if s.service)


def test_validation_reads_the_same_declarations():
    for section in dataclasses.fields(Settings):
        for f in dataclasses.fields(section.default_factory):
            choices = option_choices(section.name, f.name)
            if choices is None or f.name == "method" and section.name == "combine":
                continue
            for value in choices:
                Settings().replace(section.name, **{f.name: value}).validate()
            with pytest.raises(SettingsError, match=f"{section.name}.{f.name}"):
                Settings().replace(section.name, **{f.name: "no-such-value"}).validate()
