"""A name -> class registry (techniques, objectives): loud on a clash, helpful on a miss."""

from __future__ import annotations


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "module", "objective": names the thing in messages

    def register(self, cls: type) -> type:
        """Class decorator: registers `cls` under its `name`."""
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"{self.kind} `{cls.name}` is already registered by {self[cls.name].__qualname__}")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        if name not in self:
            known = ", ".join(sorted(self)) or "none"
            raise ValueError(
                f"unknown {self.kind} type `{name}`; registered {self.kind}s: {known} (a plugin module registers more)"
            )
        return self[name]
