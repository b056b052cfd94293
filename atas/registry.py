"""One registry shape for everything looked up by name: methods, models, datasets and attacks.

    MODELS = Registry("model", group="atas.models")

    @MODELS.register("my_net")                 # or MODELS.register("my_net", factory)
    def my_net(num_classes, in_channels=3): ...

    MODELS.get("my_net")                       # unknown name: ConfigError listing the valid ones
    MODELS.names()                             # every registered name

Names map to objects (a class, a factory, a dataset's facts), never to code to `eval` (timm).
A registry is a dict, so `name in MODELS` and `MODELS.items()` read as they always did.

Other packages add their own entries through the registry's entry-point group, e.g. in their
pyproject.toml:

    [project.entry-points."atas.methods"]
    my_method = "my_pkg.methods"               # importing it runs its @register

The groups are loaded the first time a registry is asked for a name it does not hold (or for its
list of names), so an installed plugin is there for `atas recipes`, `--methods` and configs alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from atas.values import ConfigError

# Every group a package may provide entries for (atas.external loads them all for `--import`).
GROUPS = ("atas.methods", "atas.models", "atas.datasets", "atas.attacks")


class PluginError(ConfigError):
    """An installed entry point failed to load; the message names it."""


def load_entry_points(group: str) -> list[str]:
    """Import every installed entry point of `group` (their registration runs on import)."""
    loaded = []
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must say which one it is
            raise PluginError(
                f"the installed plugin {ep.name!r} ({ep.value}, entry point group {group!r}) "
                f"failed to load: {type(e).__name__}: {e}"
            ) from e
        loaded.append(ep.value)
    return loaded


class Registry(dict):
    """name -> object, with `register`, `get`, `names` and one error wording for an unknown name.

    kind: what an entry is, for messages ("method", "model"). group: the entry-point group
    plugins register through (None: none). ordered: "sorted" lists names alphabetically,
    "registration" in the order they were added (attacks: cheapest first). hint: appended to the
    unknown-name error (how a user's own entry is made visible). aliases: other spellings."""

    def __init__(
        self,
        kind: str,
        group: str | None = None,
        ordered: str = "sorted",
        hint: str = "",
        aliases: dict[str, str] | None = None,
    ):
        super().__init__()
        self.kind, self.group, self.ordered, self.hint = kind, group, ordered, hint
        self.aliases = dict(aliases or {})
        self._plugins_loaded = group is None

    def register(self, name: Any = None, obj: Any = None, *, replace: bool = False) -> Any:
        """Add `obj` under `name`; without `obj`, a decorator. A class without a name given is
        registered under its `name` attribute. A name taken twice is an error (replace=True: on purpose)."""

        def add(obj: Any) -> Any:
            key = name if name is not None else getattr(obj, "name", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.kind} needs a name to be registered under")
            if key in self and self[key] is not obj and not replace:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self[key] = obj
            return obj

        if callable(name) and obj is None:  # @REGISTRY.register on a class with a `name`
            name, target = None, name
            return add(target)
        return add if obj is None else add(obj)

    def key(self, name: str) -> str:
        """The registered spelling of `name` (its alias resolved)."""
        return self.aliases.get(name, name)

    # A registry's get raises for an unknown name (listing the valid ones) where dict.get returns a
    # default: another contract under the same name, on purpose (`name in REGISTRY` asks politely).
    def get(self, name: str) -> Any:  # type: ignore[override]
        """The entry registered as `name`; ConfigError (a ValueError) listing the valid names if there is none."""
        key = self.key(name)
        if key not in self:
            self.load_plugins()
        if key not in self:
            raise ConfigError(self.unknown(name))
        return self[key]

    def names(self) -> list[str]:
        """Every registered name (installed plugins included)."""
        self.load_plugins()
        return sorted(self) if self.ordered == "sorted" else list(self)

    def unknown(self, name: Any, names: Iterable[str] | None = None) -> str:
        """The one wording of an unknown name: what was asked for and what is valid."""
        valid = ", ".join(self.names() if names is None else names)
        aliases = f" (aliases: {', '.join(self.aliases)})" if self.aliases else ""
        return f"unknown {self.kind} {name!r}; valid: {valid}{aliases}{self.hint}"

    def load_plugins(self) -> None:
        if not self._plugins_loaded and self.group is not None:
            self._plugins_loaded = True  # first: a plugin that looks a name up does not recurse
            load_entry_points(self.group)
