"""The plugin as pyworkflow sees it."""
import importlib.metadata as md
import os

import pyworkflow.plugin

import scipion_cloudexec


def test_registered_through_the_pyworkflow_entry_point():
    eps = [e for e in md.entry_points(group="pyworkflow.plugin") if e.value == "scipion_cloudexec"]
    assert len(eps) == 1
    assert issubclass(eps[0].load().Plugin, pyworkflow.plugin.Plugin)


def test_package_layout_follows_scipion_conventions():
    root = os.path.dirname(scipion_cloudexec.__file__)
    for sub in ("executors", "protocols", "tests"):
        assert os.path.isfile(os.path.join(root, sub, "__init__.py"))
    top = os.path.dirname(root)
    assert os.path.isfile(os.path.join(top, "CHANGES.md"))
    assert os.path.isfile(os.path.join(top, "pyproject.toml"))


def test_cli_entry_point_is_installed():
    scripts = [e for e in md.entry_points(group="console_scripts") if e.name == "scipion-cloudexec"]
    assert scripts and scripts[0].value == "scipion_cloudexec.cli:main"
