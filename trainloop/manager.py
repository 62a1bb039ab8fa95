"""The plugin manager: pluggy's, with trainloop's discovery, naming and error rules."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import Any

import pluggy

from trainloop import hookspecs
from trainloop.errors import UsageError

ENTRY_POINT_GROUP = "trainloop"
_PLAIN_IMPL = {  # what an unmarked ``on_*`` function is: a plain hook implementation
    "wrapper": False,
    "hookwrapper": False,
    "optionalhook": False,
    "tryfirst": False,
    "trylast": False,
    "specname": None,
}


def builtin_plugin_names() -> list[str]:
    """Names of the built-in plugins: the modules of ``trainloop.plugins``, sorted."""
    import trainloop.plugins

    return sorted(
        info.name
        for info in pkgutil.iter_modules(trainloop.plugins.__path__)
        if not info.name.startswith("_")
    )


class PluginManager(pluggy.PluginManager):
    """A pluggy PluginManager with trainloop's hook specs and rules.

    * ``origins[name]`` says where each plugin came from (``built-in``,
      ``entry point (dist version)``, ``-p``, ``recipe``, ``api``).
    * A hook implementation whose name matches no hook is an error at registration,
      as :class:`~trainloop.UsageError` naming the plugin and the bad name.
    * Functions named ``on_*`` are hook implementations without ``@hookimpl``.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("on_") and inspect.isroutine(getattr(plugin, name)):
            return dict(_PLAIN_IMPL)
        return opts

    def get_canonical_name(self, plugin: Any) -> str:
        base = getattr(plugin, "__name__", None) or type(plugin).__name__
        name, number = base, 2
        while self.has_plugin(name):
            name, number = f"{base}-{number}", number + 1
        return name

    def register(self, plugin: Any, name: str | None = None, origin: str = "api") -> str | None:
        """Register ``plugin`` (a module or an object); return its name, ``None`` if blocked."""
        label = name or self.get_canonical_name(plugin)
        try:
            registered = super().register(plugin, label)
        except pluggy.PluginValidationError as error:
            raise UsageError(f"plugin {label!r}: {error}") from None
        if registered is None:
            return None
        unknown = [
            caller.name for caller in self.get_hookcallers(plugin) or () if not caller.has_spec()
        ]
        if unknown:
            self.unregister(plugin)
            hint = difflib.get_close_matches(unknown[0], self.hook_names(), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UsageError(
                f"plugin {label!r} implements unknown hook {unknown[0]!r}{suggestion}; "
                "see trainloop.hookspecs for the hooks there are"
            )
        self.origins[registered] = origin
        self._changed()
        return registered

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        removed = super().unregister(plugin, name)
        self._changed()
        return removed

    def hook_names(self) -> list[str]:
        """Names of all hooks that have a specification."""
        return [name for name, caller in vars(self.hook).items() if caller.has_spec()]

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a plugin is registered or unregistered."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in getattr(self, "_listeners", ()):
            callback()

    # --- discovery ---------------------------------------------------------------------

    def load_builtins(self) -> None:
        """Register every built-in plugin module under its short name."""
        for name in builtin_plugin_names():
            if not self.is_blocked(name):
                module = importlib.import_module(f"trainloop.plugins.{name}")
                self.register(module, name, origin="built-in")

    def load_entry_points(self) -> None:
        """Register the plugins that installed distributions declare in group ``trainloop``."""
        before = set(self.origins)
        self.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin, dist in self.list_plugin_distinfo():
            name = self.get_name(plugin)
            if name is not None and name not in before:
                self.origins[name] = f"entry point ({dist.project_name} {dist.version})"

    def load_by_spec(self, spec: str) -> None:
        """Handle one ``-p`` value: ``no:NAME`` blocks, ``NAME`` or ``module:attr`` adds."""
        if spec.startswith("no:"):
            name = spec[3:]
            if self.has_plugin(name):
                self.unregister(name=name)
            self.set_blocked(name)
            return
        if self.has_plugin(spec):
            return
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(
                f"-p {spec}: no such plugin: not built in ({', '.join(builtin_plugin_names())}),"
                f" not an installed entry point, and not an importable module ({error})"
            ) from None
        plugin: Any = module
        if attribute:
            try:
                plugin = getattr(module, attribute)
            except AttributeError:
                raise UsageError(
                    f"-p {spec}: module {module_name!r} has no {attribute!r}"
                ) from None
        if inspect.isclass(plugin):  # -p module:Class means one instance of it
            try:
                plugin = plugin()
            except TypeError as error:
                raise UsageError(
                    f"-p {spec}: cannot make a {attribute} without arguments ({error}): point -p at an instance"
                ) from None
        self.register(plugin, spec, origin="-p")

    # --- reporting ---------------------------------------------------------------------

    def implemented_hooks(self, plugin: Any) -> list[str]:
        """The hooks ``plugin`` implements, plus those of plugin classes its module defines."""
        names = {caller.name for caller in self.get_hookcallers(plugin) or ()}
        if isinstance(plugin, ModuleType):
            for _, cls in inspect.getmembers(plugin, inspect.isclass):
                if cls.__module__ == plugin.__name__:
                    names.update(_hooks_of_class(self, cls))
        return sorted(names)

    def describe_exception(self, error: BaseException) -> str | None:
        """Say which plugin and hook raised ``error``, from its traceback, or ``None``."""
        owners = {}
        for caller in vars(self.hook).values():
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    code = getattr(impl.function, "__code__", None)
                    if code is not None:
                        owners[code] = (impl.plugin_name, caller.name)
        found = None
        traceback: TracebackType | None = error.__traceback__
        while traceback is not None:
            found = owners.get(traceback.tb_frame.f_code, found)
            traceback = traceback.tb_next
        if found is None:
            return None
        return f"plugin {found[0]!r} raised it in hook {found[1]!r}"


def _hooks_of_class(manager: PluginManager, cls: type) -> set[str]:
    names = set()
    for attribute, value in vars(cls).items():
        if not inspect.isfunction(value):
            continue
        marked = getattr(value, f"{hookspecs.PROJECT}_impl", None) is not None
        if marked or attribute.startswith("on_"):
            names.add(attribute)
    return names
