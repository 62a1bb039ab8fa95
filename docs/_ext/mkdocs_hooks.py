"""mkdocs hooks: pages that keep up with the code by themselves.

* ``<!-- builtin-plugins -->`` in a page becomes a table of the built-in plugins: one
  row per module in ``plugins/``, with the first line of its docstring, linked to
  ``plugins/<name>.md`` when that page exists.
* ``<!-- hooks: GROUP -->`` in a page becomes the reference of that group of hooks:
  one mkdocstrings entry per hook spec, in source order, each followed by the built-in
  plugins that implement it. The groups are the section comments of
  ``trainloop/hookspecs.py`` (``# --- Title: ...``), with the ``on_predict_*`` events
  as their own group ``Predict``, so a hook added there shows up by itself.
* ``<!-- modules: PACKAGE -->`` becomes a mkdocstrings entry (``::: PACKAGE.NAME``) for
  each module of the package, in name order, so a module added later is in the API
  reference by itself (``trainloop.plugins`` is the ``plugins/`` folder).
* ``<!-- plugin-options -->`` becomes, for each built-in plugin with options, a table
  of the options its ``add_options`` adds (with their defaults and help), read from an
  argument parser it fills when the site is built.
* In ``text`` and ``console`` code blocks, ``0.93±0.02`` (a number the tests compare
  with a tolerance, ``tests/docs_output.py``) shows as ``0.93``: what the program prints.
* The nav sections "Plugins" and "Learn" get every page of ``docs/plugins/`` and
  ``docs/learn/`` that the nav does not list yet, in name order after the listed ones,
  so a page added later is never left out of the site.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- builtin-plugins -->"
MODULES = re.compile(r"<!-- modules: (?P<package>[\w.]+) -->")
OPTIONS_MARKER = "<!-- plugin-options -->"
HOOK_GROUP = re.compile(r"<!-- hooks: (?P<group>[^>]+?) -->")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
TOLERANCE = re.compile(rf"({NUMBER})±{NUMBER}")  # as in tests/docs_output.py
OUTPUT_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```(?:text|console)\n.*?^(?P=indent)```$", re.M | re.S
)
AUTO_SECTIONS = {"Plugins": "plugins", "Learn": "learn"}


def builtin_plugins() -> list[tuple[str, str]]:
    """(name, one-line summary) of each built-in plugin module, by name."""
    plugins = []
    for path in sorted((ROOT / "plugins").glob("*.py")):
        if path.name.startswith("_"):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = docstring.strip().splitlines()[0] if docstring.strip() else ""
        summary = re.sub(rf"^{re.escape(path.stem)}\s*:\s*", "", summary)
        summary = summary.replace("``", "`")
        plugins.append((path.stem, summary[:1].upper() + summary[1:]))
    return plugins


def plugin_table(docs_dir: Path) -> str:
    rows = ["| plugin | what it does |", "| --- | --- |"]
    for name, summary in builtin_plugins():
        label = f"[{name}]({name}.md)" if (docs_dir / "plugins" / f"{name}.md").exists() else name
        rows.append(f"| {label} | {summary} |")
    return "\n".join(rows)


def hook_groups() -> dict[str, list[str]]:
    """The hook specs of ``trainloop/hookspecs.py`` by group, in source order.

    A group is a section of the module (the title of its ``# --- Title: ...`` comment),
    except that the predict events form the group ``Predict``.
    """
    source = (ROOT / "trainloop" / "hookspecs.py").read_text()
    sections = [
        (number, match[1].strip())
        for number, line in enumerate(source.splitlines(), start=1)
        if (match := re.match(r"# --- ([^:(-]+)", line))
    ]
    groups: dict[str, list[str]] = {}
    for node in ast.parse(source).body:
        is_spec = isinstance(node, ast.FunctionDef) and any(
            "hookspec" in ast.unparse(decorator) for decorator in node.decorator_list
        )
        if not is_spec:
            continue
        title = [title for number, title in sections if number < node.lineno][-1]
        if node.name.startswith("on_predict_"):
            title = "Predict"
        groups.setdefault(title, []).append(node.name)
    return groups


def hook_implementers() -> dict[str, list[str]]:
    """For each hook, the built-in plugins that implement it (as ``trainloop plugins``)."""
    from trainloop.manager import PluginManager

    manager = PluginManager()
    manager.load_builtins()
    implementers: dict[str, list[str]] = {}
    for name, plugin in sorted(manager.list_name_plugin()):
        for hook in manager.implemented_hooks(plugin):
            implementers.setdefault(hook, []).append(name)
    return implementers


def hook_reference(group: str, docs_dir: Path) -> str:
    """The Markdown of one group of the hook reference."""
    hooks = hook_groups().get(group)
    if hooks is None:
        raise ValueError(
            f"no hook group {group!r} in trainloop/hookspecs.py: {list(hook_groups())}"
        )
    implementers = hook_implementers()
    parts = []
    for hook in hooks:
        plugins = [
            f"[{name}](../plugins/{name}.md)"
            if (docs_dir / "plugins" / f"{name}.md").exists()
            else name
            for name in implementers.get(hook, [])
        ]
        used_by = ", ".join(plugins) if plugins else "none (the core, a recipe or your own plugins)"
        parts.append(
            f"::: trainloop.hookspecs.{hook}\n    options:\n      heading_level: 3\n      show_root_full_path: false\n\n"
            f"Built-in plugins that implement it: {used_by}.\n"
        )
    return "\n".join(parts)


def package_modules(package: str) -> list[str]:
    """The dotted names of the public modules of ``package`` (a package of this project)."""
    folder = (
        ROOT / "plugins" if package == "trainloop.plugins" else ROOT.joinpath(*package.split("."))
    )
    return [
        f"{package}.{path.stem}"
        for path in sorted(folder.glob("*.py"))
        if not path.name.startswith("_")
    ]


def module_entries(package: str) -> str:
    return "\n".join(f"::: {module}\n" for module in package_modules(package))


def plugin_options(name: str) -> list[tuple[str, str, str]]:
    """(option, default, help) of each command-line option the plugin ``name`` adds."""
    import argparse
    import importlib

    module = importlib.import_module(f"trainloop.plugins.{name}")
    if not hasattr(module, "add_options"):
        return []
    parser = argparse.ArgumentParser(add_help=False)
    module.add_options(parser=parser)
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its options
        if isinstance(action, argparse.BooleanOptionalAction) or not action.option_strings:
            option = ", ".join(action.option_strings)
        else:
            value = action.metavar or (
                "{" + ",".join(map(str, action.choices)) + "}"
                if action.choices
                else action.dest.upper()
            )
            value = f"[{value}]" if action.nargs == "?" else value
            option = ", ".join(action.option_strings) + ("" if action.nargs == 0 else f" {value}")
        if isinstance(action.metavar, tuple):
            option = ", ".join(action.option_strings) + " " + " ".join(action.metavar)
        default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
        rows.append((f"`{option}`", default, text))
    return rows


def options_reference(docs_dir: Path) -> str:
    parts = []
    for name, _ in builtin_plugins():
        rows = plugin_options(name)
        if not rows:
            continue
        page = f"../plugins/{name}.md"
        title = f"[{name}]({page})" if (docs_dir / "plugins" / f"{name}.md").exists() else name
        parts.append(f"### {name}\n\nThe options of the {title} plugin:\n")
        parts.append("| option | default | what it does |\n| --- | --- | --- |")
        parts.extend(f"| {option} | {default} | {text} |" for option, default, text in rows)
        parts.append("")
    return "\n".join(parts)


def show_values(markdown: str) -> str:
    """``0.93±0.02`` -> ``0.93`` inside the text and console code blocks."""
    return OUTPUT_BLOCK.sub(lambda block: TOLERANCE.sub(r"\1", block[0]), markdown)


def complete_nav(nav: list[Any], docs_dir: Path) -> list[Any]:
    """Add the pages of the auto sections that ``nav`` does not list."""
    listed = set(_files(nav))
    for item in nav:
        if not isinstance(item, dict):
            continue
        for title, entries in item.items():
            folder = AUTO_SECTIONS.get(title)
            if folder is None or not isinstance(entries, list):
                continue
            for page in sorted((docs_dir / folder).glob("*.md")):
                relative = f"{folder}/{page.name}"
                if relative not in listed:
                    entries.append({page.stem: relative})
    return nav


def _files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [file for item in nav for file in _files(item)]
    if isinstance(nav, dict):
        return [file for value in nav.values() for file in _files(value)]
    return []


def on_config(config: Any) -> Any:
    if config["nav"]:
        complete_nav(config["nav"], Path(config["docs_dir"]))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"])
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, plugin_table(docs_dir))
    if OPTIONS_MARKER in markdown:
        markdown = markdown.replace(OPTIONS_MARKER, options_reference(docs_dir))
    markdown = MODULES.sub(lambda match: module_entries(match["package"]), markdown)
    markdown = HOOK_GROUP.sub(lambda match: hook_reference(match["group"], docs_dir), markdown)
    return show_values(markdown)
