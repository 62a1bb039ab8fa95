"""The plugin manager: pluggy's, with trainloop's discovery, naming and error rules."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import Any

import pluggy

from trainloop import hookspecs
from trainloop.errors import UsageError

ENTRY_POINT_GROUP = "trainloop"
INTEGRATIONS = {  # plugins kept in this repository as distributions of their own
    "mlflow": "pip install ./integrations/trainloop-mlflow",
    "wandb": "pip install ./integrations/trainloop-wandb",
}
_PLAIN_IMPL = {  # what an unmarked ``on_*`` function is: a plain hook implementation
    "wrapper": False,
    "hookwrapper": False,
    "optionalhook": False,
    "tryfirst": False,
    "trylast": False,
    "specname": None,
}


BUILTIN_PLUGINS = (
    "checkpoint",
    "device",
    "distributed",
    "early_stopping",
    "grad_accumulation",
    "grad_clip",
    "interrupt",
    "lr_scheduler",
    "metrics_jsonl",
    "model_saver",
    "nan_guard",
    "precision",
    "predictions",
    "profiler",
    "progress",
    "summary",
    "tensorboard",
    "throughput",
    "weight_averaging",
)
"""The built-in plugins in the order they register (like pytest's ``default_plugins``).

Where two implementations of a hook carry the same marker, the one whose plugin comes
later in the declared order is called first (pluggy's rule for registration order). An
object that a plugin module registers during a run (in ``configure``, or a per-batch
helper at ``on_fit_begin``) takes its module's place in that order, whenever it is
registered; two classes of one module, the order in which the module defines them.
This declared order, not the modules' file names nor the moment an object registers,
decides ties; ``trainloop plugins --order`` shows the result for every hook.
"""


def builtin_plugin_names() -> list[str]:
    """Names of the built-in plugins, in their declared order (:data:`BUILTIN_PLUGINS`)."""
    return list(BUILTIN_PLUGINS)


def builtin_plugin_modules() -> list[str]:
    """Names of the modules in ``trainloop.plugins``, sorted (a test checks they are all
    declared in :data:`BUILTIN_PLUGINS`)."""
    import trainloop.plugins

    return sorted(
        info.name
        for info in pkgutil.iter_modules(trainloop.plugins.__path__)
        if not info.name.startswith("_")
    )


@dataclasses.dataclass(frozen=True)
class FailedPlugin:
    """An installed entry-point plugin that could not be loaded, and why."""

    name: str
    """The entry point's name, which ``-p no:NAME`` switches off."""
    entry_point: str
    """The entry point as declared: ``name = module:attr``."""
    distribution: str
    """The name of the distribution that declares it: ``trainloop-foo``."""
    version: str
    """That distribution's version."""
    error: str
    """The error, on one line: ``ModuleNotFoundError: No module named 'foo'``."""

    def describe(self) -> str:
        """One line naming the plugin, where it comes from and the error."""
        return (
            f"plugin {self.name!r} (entry point '{self.entry_point}' of {self.distribution}"
            f" {self.version}) failed to load: {self.error}"
        )


def one_line(error: BaseException) -> str:
    """``error`` as ``Type: message`` on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class PluginManager(pluggy.PluginManager):
    """A pluggy PluginManager with trainloop's hook specs and rules.

    * ``origins[name]`` says where each plugin came from (``built-in``,
      ``entry point (dist version)``, ``-p``, ``recipe``, ``api``).
    * A hook implementation whose name matches no hook is an error at registration,
      as :class:`~trainloop.UsageError` naming the plugin and the bad name.
    * Functions named ``on_*`` are hook implementations without ``@hookimpl``.
    * ``failed[name]`` holds the entry-point plugins that could not be loaded (each a
      ``FailedPlugin``: name, entry point, distribution, error); one broken installed
      package does not stop the others.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        self.failed: dict[str, FailedPlugin] = {}
        self._listeners: list[Callable[[], None]] = []
        self._registrations = 0
        self._places: dict[int, tuple[int, int, int]] = {}  # id(plugin): its place

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
        self._place(plugin)
        self._changed()
        return registered

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        removed = super().unregister(plugin, name)
        self._places.pop(id(removed), None)
        self._changed()
        return removed

    # --- the declared order ---------------------------------------------------------------

    def _place(self, plugin: Any) -> None:
        """Give ``plugin`` its place in the declared order and re-sort its hooks' callers.

        A plugin's place is ``(owner, class, registration)``: ``owner`` is the
        registration number of the registered module that defines its class (an object a
        plugin module registers during a run stands where its module stands), else its
        own; ``class`` is the class's position among the module's definitions. Within
        each of pluggy's tiers (wrappers apart; ``tryfirst``, plain, ``trylast``) the
        implementations are kept sorted by place: pluggy calls the last one first.
        """
        self._registrations += 1
        owner, position = self._registrations, 0
        module = inspect.getmodule(type(plugin))
        if not isinstance(plugin, ModuleType) and module is not None:
            registered = self._places.get(id(module))
            if registered is not None and self.is_registered(module):
                owner = registered[0]
                position = _definition_position(module, type(plugin))
        self._places[id(plugin)] = (owner, position, self._registrations)
        for caller in self.get_hookcallers(plugin) or ():
            # pluggy keeps the implementations in its own list, in calling order reversed;
            # it has no public way to place one, so the list is sorted in place here.
            caller._hookimpls.sort(key=self._sort_key)

    def _sort_key(self, impl: pluggy.HookImpl) -> tuple[bool, int, tuple[int, int, int]]:
        tier = 2 if impl.tryfirst else 0 if impl.trylast else 1
        place = self._places.get(id(impl.plugin), (0, 0, 0))
        return (impl.wrapper or impl.hookwrapper, tier, place)

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

    def load_entry_points(self, name: str | None = None) -> list[FailedPlugin]:
        """Register the plugins that installed distributions declare in group ``trainloop``.

        Like pluggy's ``load_setuptools_entrypoints`` (blocked and registered names are
        skipped), except that a plugin that fails to import or to register is left out
        and returned, and kept in ``failed``, instead of stopping the others. ``name``
        loads only the entry point of that name.
        """
        failures = []
        for dist in importlib.metadata.distributions():
            for entry in dist.entry_points:
                if (
                    entry.group != ENTRY_POINT_GROUP
                    or (name is not None and entry.name != name)
                    or self.has_plugin(entry.name)
                    or self.is_blocked(entry.name)
                    or entry.name in self.failed
                ):
                    continue
                project = dist.metadata["name"]
                origin = f"entry point ({project} {dist.version})"
                try:
                    self.register(entry.load(), entry.name, origin=origin)
                except Exception as error:  # a broken package must not stop the others
                    reason = str(error) if isinstance(error, UsageError) else one_line(error)
                    declared = f"{entry.name} = {entry.value}"
                    failure = FailedPlugin(entry.name, declared, project, dist.version, reason)
                    self.failed[entry.name] = failure
                    failures.append(failure)
        return failures

    def load_by_spec(self, spec: str) -> None:
        """Handle one ``-p`` value: ``no:NAME`` blocks; ``NAME`` (an entry point's), a
        module or ``module:attr`` adds. Each failure is a UsageError naming the value."""
        if spec.startswith("no:"):
            name = spec[3:]
            if self.has_plugin(name):
                self.unregister(name=name)
            self.set_blocked(name)
            return
        if self.has_plugin(spec):
            return
        if spec not in self.failed:
            self.load_entry_points(name=spec)  # an entry point named with -p loads all the same
        if spec in self.failed:
            raise UsageError(f"-p {spec}: {self.failed[spec].describe()}")
        if self.has_plugin(spec):
            return
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name != missing and not module_name.startswith(f"{missing}."):
                raise UsageError(_import_failed(spec, module_name, error)) from None
            hint = f"; it installs with: {INTEGRATIONS[spec]}" if spec in INTEGRATIONS else ""
            raise UsageError(
                f"-p {spec}: no such plugin: not built in ({', '.join(builtin_plugin_names())}),"
                f" not an installed entry point, and not an importable module ({error}){hint}"
            ) from None
        except Exception as error:
            raise UsageError(_import_failed(spec, module_name, error)) from None
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
        if not self.get_hookcallers(plugin):  # an unrelated module, such as a library itself
            self.unregister(plugin)
            hint = INTEGRATIONS.get(spec)
            raise UsageError(
                f"-p {spec}: {module_name!r} implements no trainloop hook, so it is not a plugin"
                + (f"; the {spec} plugin installs with: {hint}" if hint else "")
            )

    # --- reporting ---------------------------------------------------------------------

    def implemented_hooks(self, plugin: Any) -> list[str]:
        """The hooks ``plugin`` implements, plus those of plugin classes its module defines."""
        names = {caller.name for caller in self.get_hookcallers(plugin) or ()}
        if isinstance(plugin, ModuleType):
            for _, cls in inspect.getmembers(plugin, inspect.isclass):
                if cls.__module__ == plugin.__name__:
                    names.update(_hooks_of_class(self, cls))
        return sorted(names)

    def call_order(self, hook_name: str) -> list[tuple[str, str]]:
        """The implementations of ``hook_name`` in the order pluggy calls them, each as
        ``(plugin name, marker)``; the marker is ``wrapper``, ``tryfirst``, ``trylast``
        or ``""``. Plugin classes that a module defines (registered during a run) are
        listed at their module's place in the declared order as ``module:Class``."""
        rank = {"wrapper, tryfirst": 0, "wrapper": 1, "wrapper, trylast": 2, "tryfirst": 3,
                "": 4, "trylast": 5}  # fmt: skip
        entries = []  # (rank, place, name, marker): the highest place first within a rank
        for name, plugin in self.list_name_plugin():
            if plugin is None:
                continue
            owner, _, registration = self._places.get(id(plugin), (0, 0, 0))
            candidates = [(name, getattr(plugin, hook_name, None), (owner, 0, registration))]
            if isinstance(plugin, ModuleType):
                for class_name, cls in inspect.getmembers(plugin, inspect.isclass):
                    if cls.__module__ == plugin.__name__ and hook_name in vars(cls):
                        place = (owner, _definition_position(plugin, cls), registration)
                        candidates.append((f"{name}:{class_name}", vars(cls)[hook_name], place))
            for label, function, place in candidates:
                if function is None or not inspect.isroutine(function):
                    continue
                opts = getattr(function, f"{hookspecs.PROJECT}_impl", None)
                if opts is None and not hook_name.startswith("on_"):
                    continue
                opts = opts or {}
                wrapper = opts.get("wrapper") or opts.get("hookwrapper")
                tier = (
                    "tryfirst" if opts.get("tryfirst") else "trylast" if opts.get("trylast") else ""
                )
                marker = ", ".join(word for word in ("wrapper" if wrapper else "", tier) if word)
                entries.append((rank[marker], tuple(-number for number in place), label, marker))
        return [(label, marker) for _, _, label, marker in sorted(entries)]

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


def _definition_position(module: ModuleType, cls: type) -> int:
    """Where ``module`` defines ``cls`` among its names (definition order), from 1."""
    for position, value in enumerate(vars(module).values(), start=1):
        if value is cls:
            return position
    return 0


def _import_failed(spec: str, module_name: str, error: BaseException) -> str:
    return f"-p {spec}: module {module_name!r} was found but importing it failed: {one_line(error)}"


def _hooks_of_class(manager: PluginManager, cls: type) -> set[str]:
    names = set()
    for attribute, value in vars(cls).items():
        if not inspect.isfunction(value):
            continue
        marked = getattr(value, f"{hookspecs.PROJECT}_impl", None) is not None
        if marked or attribute.startswith("on_"):
            names.add(attribute)
    return names
