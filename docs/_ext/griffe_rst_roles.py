"""A griffe extension: Sphinx roles in docstrings become mkdocstrings cross-references.

It also labels the ``firstresult`` hooks in ``trainloop.hookspecs``, so the hook
reference shows which hooks are steps with one owner.

trainloop's docstrings are read by people in ``help()`` too, so they keep Sphinx's
``:class:`~trainloop.StopFit``` roles and ``Example::`` literal blocks; this turns them
into Markdown for the site: ``[StopFit][trainloop.StopFit]`` and ``Example:``. A role
naming something outside trainloop (``shutil.rmtree``) becomes plain code.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`(~?)([\w.]+)`")


class RstRoles(griffe.Extension):
    """Rewrite Sphinx roles and ``::`` literal-block markers in every docstring."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
        # on_object does not see a top-level package itself
        if pkg.docstring is not None:
            pkg.docstring.value = convert(pkg.docstring.value, pkg)

    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, obj)
        if obj.is_function and obj.module.path == "trainloop.hookspecs":
            for decorator in obj.decorators:  # a badge beside the hook's name
                if "firstresult=True" in str(decorator.value).replace(" ", ""):
                    obj.labels.add("firstresult")


def convert(text: str, obj: griffe.Object) -> str:
    def link(match: re.Match) -> str:
        short, written = match.group(1), match.group(2)
        # as Sphinx shows it: the name as written, or its last part after "~"
        label = written.rsplit(".", 1)[-1] if short else written
        target = written if "." in written else _resolve(written, obj)
        if target.startswith("plugins."):  # griffe_plugins_package: trainloop.plugins
            target = f"trainloop.{target}"
        if not target.startswith("trainloop"):  # the standard library, torch: no page here
            return f"`{label}`"
        return f"[`{label}`][{target}]"

    text = _ROLE.sub(link, text)
    # A Google "Example:" section is an admonition whose doctest output Markdown would
    # read as links; "Examples:" renders ">>>" lines as code.
    text = re.sub(r"^(\s*)Example:\n(?=\s*>>>)", r"\1Examples:\n", text, flags=re.MULTILINE)
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.MULTILINE)


def _resolve(name: str, obj: griffe.Object) -> str:
    scope: griffe.Object | None = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        if name in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return f"{obj.module.path}.{name}"
