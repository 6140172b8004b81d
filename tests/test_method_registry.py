"""The method registry: discovery of method files, labels, and the import rules of sats/methods."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

import sats.methods
from sats.methods import (base, discover_methods, get_addon_class, get_method_class, iter_methods, list_addons,
                          list_methods)
from sats.report.paper_results import PAPER_RESULTS

METHODS_DIR = Path(sats.methods.__file__).parent
FILES = sorted(p.stem for p in METHODS_DIR.glob("*.py") if p.stem != "__init__")
CONTRACTS = ("base", "addon")  # the method and add-on contracts: they register nothing


def test_a_method_file_dropped_into_a_package_is_discovered_and_registered(tmp_path, monkeypatch):
    package = tmp_path / "dropped_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_frame.py").write_text("SHARED = 1\n")
    (package / "decoder_kd.py").write_text(textwrap.dedent('''
        from sats.methods.base import CEParams, Method, register_method

        @register_method
        class DecoderKD(Method):
            name = "test-dropped-in"
            Params = CEParams

            def loss(self, batch, out, old_out, ctx):
                return self.ce_terms(batch, out)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = discover_methods("dropped_methods", [str(package)])
        assert found == ["dropped_methods._frame", "dropped_methods.decoder_kd"]
        assert "test-dropped-in" in list_methods()
        cls = get_method_class("test-dropped-in")
        assert cls.__module__ == "dropped_methods.decoder_kd" and cls.label == "test-dropped-in"  # label: the name
        assert "dropped_methods._frame" in sys.modules  # shared frames are imported too
    finally:
        base._REGISTRY.pop("test-dropped-in", None)
        for name in [m for m in sys.modules if m.split(".")[0] == "dropped_methods"]:
            del sys.modules[name]


def test_every_file_of_sats_methods_is_imported_and_every_method_file_registers_its_methods():
    assert sorted(m.rsplit(".", 1)[1] for m in sats.methods.MODULES) == FILES
    registered = {}
    for cls in [*iter_methods(), *(get_addon_class(name) for name in list_addons())]:
        registered.setdefault(cls.__module__, []).append(cls.name)
    for stem in FILES:
        assert f"sats.methods.{stem}" in sys.modules, stem
        if stem not in CONTRACTS and not stem.startswith("_"):  # a method file: registers a method or an add-on
            assert registered.get(f"sats.methods.{stem}"), f"sats/methods/{stem}.py registers no method or add-on"
    frames = [stem for stem in FILES if stem in CONTRACTS or stem.startswith("_")]
    assert not [m for m in registered if m.rsplit(".", 1)[-1] in frames], "a shared frame registers a method"


@pytest.mark.parametrize("stem", FILES)
def test_method_modules_import_no_sibling_method_no_engine_no_process_group(stem):
    """Method files share code only through base.py and the ``_`` frames, never through another method file,
    and reach the engine's services (DDP included) only through the StepContext."""
    tree = ast.parse((METHODS_DIR / f"{stem}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            if node.module == "sats.methods":
                imported.update(f"sats.methods.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    siblings = {m for m in imported if m.startswith("sats.methods.")
                and not (m.rsplit(".", 1)[1] in CONTRACTS or m.rsplit(".", 1)[1].startswith("_"))}
    assert not siblings, f"sats/methods/{stem}.py imports method modules {sorted(siblings)}"
    services = {m for m in imported if m.split(".")[:2] in (["sats", "engine"], ["torch", "distributed"])}
    assert not services, f"sats/methods/{stem}.py imports {sorted(services)} (use the StepContext)"


def test_labels_are_the_display_names_of_the_paper_and_are_never_inherited():
    labels = {cls.name: cls.label for cls in iter_methods() if cls.__module__.startswith("sats.")}
    assert labels["joint"] == "Joint training" and labels["ft"] == "FT" and labels["lwf_mc"] == "LwF-MC"
    for paper in PAPER_RESULTS:  # rows of sats methods (and their "-M" memory variants) print our label
        name, memory = paper.method.removesuffix("-m"), paper.method.endswith("-m")
        if name in labels:
            assert paper.label == labels[name] + ("-M" if memory else ""), paper


def test_a_registered_method_without_a_label_shows_its_name_not_its_parents():
    parent = get_method_class("ft")

    class Child(parent):
        name = "test-unlabelled-child"

    try:
        assert base.register_method(Child).label == "test-unlabelled-child" and parent.label == "FT"
    finally:
        base._REGISTRY.pop("test-unlabelled-child", None)
