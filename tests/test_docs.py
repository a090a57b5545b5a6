"""Every public symbol has a docstring and is rendered by a `::: identifier` in docs/api/*.md.

"Rendered" mirrors mkdocstrings-python (2.x) exactly, using griffe, the library it reads code
with. A `::: X` directive renders X and, recursively, the members that pass
``do_filter_objects`` in ``mkdocstrings_handlers/python/_internal/rendering.py`` and the test in
``templates/material/_base/children.html.jinja``:

- the ``members`` option (a list; root object only) overrides filters and docstring checks;
- otherwise a member's name must pass ``filters`` (regexes, ``!`` = exclude; or ``"public"``,
  griffe's ``is_public``), inherited members are dropped, and a member with no docstring
  anywhere (griffe's ``has_docstrings``) is dropped unless ``show_if_no_docstring``;
- an imported member (an alias) is rendered only if it is public, i.e. listed in ``__all__``;
- submodules only with ``show_submodules``.

Options come from mkdocs.yml's handler options, overridden by the directive's own
``options:`` block. A public symbol (a name in the ``__all__`` of ``addkit``, ``addkit.losses``,
``addkit.discriminators``, ``addkit.sampling``, ``addkit.objective`` or ``addkit.testing``, when
present) is documented when the object it resolves to is rendered by some directive. Dunder
names such as ``__version__`` are exempt: a string cannot carry a docstring.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

griffe = pytest.importorskip("griffe")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "addkit",
    "addkit.losses",
    "addkit.discriminators",
    "addkit.sampling",
    "addkit.objective",
    "addkit.testing",
)
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$")


class _Loader(yaml.SafeLoader):
    """Safe YAML that tolerates mkdocs' ``!!python/name:`` style tags."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _global_options() -> dict[str, Any]:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    for plugin in config.get("plugins", []):
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            handlers = (plugin["mkdocstrings"] or {}).get("handlers", {})
            return dict((handlers.get("python") or {}).get("options") or {})
    return {}


def _directives() -> list[tuple[str, dict[str, Any], str]]:
    """``(identifier, options, where)`` for every ``:::`` line of docs/api/*.md."""
    found = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            block = []
            for follow in lines[i + 1 :]:
                if follow.strip() and not follow.startswith((" ", "\t")):
                    break
                block.append(follow)
            local = yaml.load("\n".join(block), Loader=_Loader) if "".join(block).strip() else None
            found.append((match[1], dict((local or {}).get("options") or {}), f"{page.name}:{i + 1}"))
    return found


def _filters(value: Any) -> Any:
    if value == "public":
        return "public"
    return [(re.compile(f.removeprefix("!")), f.startswith("!")) for f in (value or ())]


def _keep_name(name: str, filters: list[tuple[re.Pattern[str], bool]]) -> bool:
    keep, rules = None, set()
    for regex, exclude in filters:
        rules.add(exclude)
        if regex.search(name):
            keep = not exclude
    return rules != {False} if keep is None else keep


def _target(obj: Any) -> Any:
    return obj.final_target if obj.is_alias else obj


def _renders(member: Any, options: dict[str, Any], members_list: Any, filters: Any, inherited: Any) -> bool:
    """Whether mkdocstrings renders ``member`` among its parent's children."""
    # The template's test (children.html.jinja): imported members only when public.
    if not (filters == "public" or members_list is not None or not member.is_imported or member.is_public):
        return False
    # do_filter_objects (rendering.py), in its order.
    if member.inherited and inherited is not True and member.name not in (inherited or ()):
        return False
    if member.is_module and not options.get("show_submodules", False):
        return False
    if members_list is True:
        return True
    if members_list is False or members_list == []:
        return False
    if members_list is not None:
        return member.name in members_list
    if filters == "public" and not member.is_public:
        return False
    if filters != "public" and not _keep_name(member.name, filters):
        return False
    return bool(options.get("show_if_no_docstring", False) or member.has_docstrings)


def _rendered(obj: Any, options: dict[str, Any], *, root: bool = True) -> set[str]:
    """Canonical paths of ``obj`` and every member mkdocstrings renders under it."""
    out = {_target(obj).path}
    target = _target(obj)
    if not (target.is_module or target.is_class):
        return out
    members_list = options.get("members") if root else None
    filters = _filters(options.get("filters", ["!^_[^_]"]))
    inherited = options.get("inherited_members", False)
    for member in target.all_members.values():
        try:
            keep = _renders(member, options, members_list, filters, inherited)
            if keep:
                out |= _rendered(member, options, root=False)
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue  # an unresolvable import (e.g. __future__): never rendered
    return out


@functools.cache
def _package() -> Any:
    """addkit as griffe reads it (static analysis of the sources, aliases resolved)."""
    return griffe.load("addkit", search_paths=[str(ROOT)], resolve_aliases=True)


def _lookup(package: Any, path: str) -> Any:
    """The griffe object at a dotted ``addkit...`` path."""
    return package if path == "addkit" else package[path.removeprefix("addkit.")]


@pytest.fixture(scope="module")
def documented() -> set[str]:
    """Canonical paths rendered by all API pages."""
    package = _package()
    base = _global_options()
    paths: set[str] = set()
    for identifier, local, where in _directives():
        assert identifier.split(".")[0] == "addkit", f"{where}: ::: {identifier} is outside addkit"
        paths |= _rendered(_lookup(package, identifier), {**base, **local})
    return paths


def _public_symbols() -> list[tuple[str, str]]:
    symbols = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue  # a part not written yet
        public = getattr(module, "__all__", ())
        symbols += [(name, s) for s in public if not (s.startswith("__") and s.endswith("__"))]
    return symbols


def test_api_pages_have_directives() -> None:
    assert _directives(), "no ::: directives found in docs/api/*.md"


@pytest.mark.parametrize("module,name", _public_symbols())
def test_public_symbol_documented(module: str, name: str, documented: set[str]) -> None:
    obj = _target(_lookup(_package(), f"{module}.{name}"))
    assert obj.docstring is not None and obj.docstring.value.strip(), (
        f"{module}.{name} (defined as {obj.path}) has no docstring"
    )
    assert obj.path in documented, (
        f"{module}.{name} (defined as {obj.path}) is rendered by no '::: ...' directive in docs/api/*.md; "
        f"add '::: {obj.parent.path}' or '::: {obj.path}' to an API page"
    )


def _inventory(site: Path) -> set[str]:
    """Python object paths in a built site's ``objects.inv`` (Sphinx inventory v2)."""
    marker = b"# The remainder of this file is compressed using zlib.\n"
    _, found, body = site.joinpath("objects.inv").read_bytes().partition(marker)
    assert found, "objects.inv has no zlib section"
    return {line.split()[0] for line in zlib.decompress(body).decode().splitlines() if " py:" in line}


def test_mirror_matches_mkdocs_build(tmp_path: Path) -> None:
    """The rule above renders exactly what a real ``mkdocs build`` puts in its inventory."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(site), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    package, base = _package(), _global_options()
    built = {_target(_lookup(package, p)).path for p in _inventory(site)}
    mirrored: set[str] = set()
    for identifier, local, _ in _directives():
        mirrored |= _rendered(_lookup(package, identifier), {**base, **local})
    only_here, only_built = sorted(mirrored - built), sorted(built - mirrored)
    assert mirrored == built, f"mirrored only: {only_here}; built only: {only_built}"
