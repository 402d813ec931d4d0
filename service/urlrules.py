"""URL rules parsed, and their `url_for` builders generated, once per process, not once per app.

When a rule is added to an app, werkzeug parses its text into the parts the router matches
(`Rule._parse_rule`: a regular expression per path segment, with its weights) and generates
the source of two Python functions that build its URL (`Rule._compile_builder`: with and
without unknown arguments as a query string) and compiles them: most of the time it takes
to build an app, paid again by every `flask --app wsgi` command and every app a test
builds. `Rule` keeps both by what they depend on.

- A parse depends on the text and on the converter classes it names (their regex, weight
  and whether they match a slash); it is reused only where the app's map names the same
  classes, and each rule still gets converter objects of its own, bound to its own map.
- A builder depends on the rule's text, its parsed parts and the names of its defaults,
  and on nothing of the app (it reaches the rule's converters through the rule it is bound
  to). A rule with a default for one of its own variables has that default's converted
  value written into its builder; it is compiled as werkzeug does.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.routing import Rule as _WerkzeugRule
from werkzeug.routing.converters import BaseConverter
from werkzeug.routing.rules import RulePart

_BUILDERS: dict[tuple[Any, ...], Callable[..., tuple[str, str]]] = {}


@dataclass(frozen=True)
class _Parsed:
    """What parsing a rule's text gives: its parts, its trace, and each variable's converter
    (name, converter name, its arguments and the class the map named when it was parsed)."""

    parts: tuple[RulePart, ...]
    trace: tuple[tuple[bool, str], ...]
    converters: tuple[tuple[str, str, tuple[Any, ...], dict[str, Any], type], ...]


_PARSED: dict[str, _Parsed] = {}


class Rule(_WerkzeugRule):
    """A werkzeug `Rule` sharing its parse and its URL builders with every rule of the same shape in the process."""

    def _parse_rule(self, rule: str) -> Iterable[RulePart]:
        parsed = _PARSED.get(rule)
        if parsed is None or any(self.map.converters.get(name) is not cls for _, name, _, _, cls in parsed.converters):
            return self._parse_anew(rule)
        self._trace.extend(parsed.trace)
        for variable, name, args, kwargs, _ in parsed.converters:
            self._converters[variable] = self.get_converter(variable, name, args, kwargs)
            self.arguments.add(variable)
        return parsed.parts

    def _parse_anew(self, rule: str) -> tuple[RulePart, ...]:
        """Parse `rule` as werkzeug does, which records this rule's trace and converters, and keep the outcome."""
        traced, self._asked = len(self._trace), []
        try:
            parts = tuple(super()._parse_rule(rule))
            _PARSED[rule] = _Parsed(parts, tuple(self._trace[traced:]), tuple(self._asked))
        finally:
            del self._asked
        return parts

    def get_converter(self, variable_name: str, converter_name: str, args: tuple[Any, ...],
                      kwargs: Mapping[str, Any]) -> BaseConverter:
        converter = super().get_converter(variable_name, converter_name, args, kwargs)
        asked = getattr(self, "_asked", None)  # a list only while `_parse_anew` parses
        if asked is not None:
            asked.append((variable_name, converter_name, args, dict(kwargs), type(converter)))
        return converter

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        defaults = self.defaults or {}
        if any(dynamic and part in defaults for dynamic, part in self._trace):
            return super()._compile_builder(append_unknown)
        shape = (self.rule, tuple(self._trace), tuple(defaults), append_unknown)
        builder = _BUILDERS.get(shape)
        if builder is None:
            builder = _BUILDERS[shape] = super()._compile_builder(append_unknown)
        return builder
