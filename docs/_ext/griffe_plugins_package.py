"""A griffe extension: the built-in plugins as ``trainloop.plugins``, as Python imports them.

The plugin modules live in ``plugins/`` at the repository root and are installed as
``trainloop.plugins`` (setuptools' ``package-dir``), which griffe cannot see from the
source tree. This loads ``plugins/`` and hangs it under the ``trainloop`` package, so
``::: trainloop.plugins.progress`` and cross-references to it work.
"""

from __future__ import annotations

from typing import Any

import griffe


class PluginsPackage(griffe.Extension):
    """Load ``plugins/`` as the member ``plugins`` of the ``trainloop`` package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path == "trainloop" and "plugins" not in pkg.members:
            pkg.set_member("plugins", loader.load("plugins"))
