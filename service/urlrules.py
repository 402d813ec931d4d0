"""URL rules whose `url_for` builders are generated once per process, not once per app.

When a rule is added to an app, werkzeug generates the source of two Python functions that
build its URL (`Rule._compile_builder`: with and without unknown arguments as a query
string) and compiles them: about two thirds of the time it takes to build an app, paid
again by every `flask --app wsgi` command and every app a test builds. A builder depends on
the rule's text, its parsed parts and the names of its defaults, and on nothing of the app
(it reaches the rule's converters through the rule it is bound to), so `Rule` keeps each one
by that shape. A rule with a default for one of its own variables has that default's
converted value written into its builder; it is compiled as werkzeug does.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from werkzeug.routing import Rule as _WerkzeugRule

_BUILDERS: dict[tuple[Any, ...], Callable[..., tuple[str, str]]] = {}


class Rule(_WerkzeugRule):
    """A werkzeug `Rule` sharing its URL builders with every rule of the same shape in the process."""

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        defaults = self.defaults or {}
        if any(dynamic and part in defaults for dynamic, part in self._trace):
            return super()._compile_builder(append_unknown)
        shape = (self.rule, tuple(self._trace), tuple(defaults), append_unknown)
        builder = _BUILDERS.get(shape)
        if builder is None:
            builder = _BUILDERS[shape] = super()._compile_builder(append_unknown)
        return builder
