"""Narrative XHTML (`Narrative.div`): txt-1 and txt-2 of FHIR R4, refused, never sanitised.

A div that breaks a rule is refused (400), not cleaned: what is stored is exactly what the
client sent (a silently altered narrative would misstate the record and its version), and a
refusal leaves no markup a later reader could run. The elements and attributes txt-1 allows
come from the specification (data/narrative-xhtml.json). Beyond them, a URL attribute may not
use a script scheme, `href` no `data:` URL, and a style attribute may not load or compute
anything (`url(`, `image-set(`, `expression(`, `@import`; CSS escapes decoded first). The div
must be one well-formed XHTML `div` (namespace `http://www.w3.org/1999/xhtml`) with no DOCTYPE, entity declaration or
processing instruction.
"""
from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple
from xml.parsers import expat

import orjson

from service.validation.r4 import DATA

XHTML = "http://www.w3.org/1999/xhtml"
_URL_ATTRIBUTES = frozenset({"href", "src", "longdesc", "cite"})
_SCRIPT_SCHEME = re.compile(r"^\s*(javascript|vbscript|livescript|mocha)\s*:", re.IGNORECASE)
#: What loads or computes content in CSS: the functions that take a URL (url, image, image-set, …),
#: expression(), @import, script URLs and bindings. Matched after CSS escapes are decoded (`u\72l(`).
_ACTIVE_STYLE = re.compile(r"(?:url|src|image|image-set|cross-fade|element|expression)\s*\(|@import|"
                           r"javascript\s*:|behavior\s*:|-moz-binding", re.IGNORECASE)
_CSS_ESCAPE = re.compile(r"\\(?:([0-9a-fA-F]{1,6})[ \t\n\r\f]?|(.))", re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|$)", re.DOTALL)


def _active_style(value: str) -> bool:
    """Whether a style attribute loads or computes anything, however its CSS is escaped or commented."""
    decoded = _CSS_ESCAPE.sub(lambda m: chr(min(int(m[1], 16), 0x10FFFF)) if m[1] else m[2], value)
    return any(_ACTIVE_STYLE.search(text) for text in (decoded, _CSS_COMMENT.sub("", decoded)))


class Breach(NamedTuple):
    """Which invariant a div breaks, and how."""

    key: str
    message: str


@cache
def _allowed() -> tuple[frozenset[str], frozenset[str]]:
    rules = orjson.loads((DATA / "narrative-xhtml.json").read_bytes())
    return frozenset(rules["elements"]), frozenset(rules["attributes"])


class _Refused(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.breach = Breach(key, message)


def _attribute_problem(element: str, name: str, value: str) -> str | None:
    if name in _URL_ATTRIBUTES:
        compact = re.sub(r"[\x00-\x20]", "", value)
        if _SCRIPT_SCHEME.match(compact):
            return f"<{element} {name}> holds a script URL"
        if name == "href" and compact.lower().startswith("data:"):
            return f"<{element} href> holds a data: URL"
    if name == "style" and _active_style(value):
        return f"<{element} style> loads or computes content (url(), expression(), @import)"
    return None


def check(div: str) -> Breach | None:
    """The first rule a narrative div breaks, or None when txt-1 and txt-2 hold."""
    elements, attributes = _allowed()
    parser = expat.ParserCreate(namespace_separator=" ")
    depth = {"level": 0, "text": False, "image": False}

    def refuse_declaration(*_: object) -> None:
        raise _Refused("txt-1", "a DOCTYPE, entity declaration or processing instruction is not allowed")

    def start(tag: str, attrs: dict[str, str]) -> None:
        namespace, _, name = tag.rpartition(" ")
        if namespace != XHTML:
            raise _Refused("txt-1", f"<{name}> is not in the XHTML namespace {XHTML}")
        if depth["level"] == 0 and name != "div":
            raise _Refused("txt-1", f"the narrative's root is <{name}>, not <div>")
        if name not in elements:
            raise _Refused("txt-1", f"<{name}> is not an element allowed in a narrative")
        for qualified, value in attrs.items():
            attribute = qualified.rpartition(" ")[2]
            if attribute.lower().startswith("on"):
                raise _Refused("txt-1", f"<{name} {attribute}>: event attributes are not allowed")
            if " " in qualified or attribute not in attributes:
                raise _Refused("txt-1", f"<{name} {attribute}> is not an attribute allowed in a narrative")
            if problem := _attribute_problem(name, attribute, value):
                raise _Refused("txt-1", problem)
        if name == "img" and attrs.get("src"):
            depth["image"] = True
        depth["level"] += 1

    def end(_: str) -> None:
        depth["level"] -= 1

    def text(data: str) -> None:
        if data.strip():
            depth["text"] = True

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = refuse_declaration
    parser.EntityDeclHandler = refuse_declaration
    parser.ProcessingInstructionHandler = refuse_declaration
    try:
        parser.Parse(div, True)
    except _Refused as refused:
        return refused.breach
    except expat.ExpatError as exc:
        return Breach("txt-1", f"not well-formed XHTML ({expat.errors.messages[exc.code]}, "
                               f"line {exc.lineno} column {exc.offset})")
    if not (depth["text"] or depth["image"]):
        return Breach("txt-2", "the narrative has no text and no image")
    return None
