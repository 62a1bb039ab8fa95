"""mkdocs hooks: pages that keep up with the code by themselves.

* ``<!-- builtin-plugins -->`` in a page becomes a table of the built-in plugins: one
  row per module in ``plugins/``, with the first line of its docstring, linked to
  ``plugins/<name>.md`` when that page exists.
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
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, plugin_table(Path(config["docs_dir"])))
    return markdown
