"""The PATCH interaction's documents, applied to a resource (FHIR R4 §3.1.0.5).

* JSON Patch (RFC 6902, `application/json-patch+json`, or a JSON array sent as
  `application/json`): add, remove, replace, move, copy, test, on JSON Pointers (RFC 6901).
* FHIRPath Patch (a `Parameters` resource, `application/fhir+json`): the operations add,
  insert, delete, replace and move on simple paths — `Type.element(.element)*`, each step
  optionally indexed (`Patient.name[0].given`); choice elements by their FHIRPath name
  (`Patient.deceased`). Any other FHIRPath (functions such as `where()`, operators) is
  refused (400, `not-supported`) naming it.
* JSON Merge Patch (RFC 7396, `application/merge-patch+json`, or a JSON object that is not a
  `Parameters` sent as `application/json`, as fhirpy's `patch()` sends).

`apply` returns the patched copy; the caller validates it like any update. With `max_bytes`, a
JSON Patch whose `copy` operations would make the resource larger than that (each `copy` can
double it) is refused (413) before the copy is made. A malformed
patch document is 400 (`invalid`); a patch that cannot apply to this resource (a missing
path, a failed `test`, an ambiguous path) is 422 (`processing`). Neither changes anything.
"""
from __future__ import annotations

import copy
import re
import typing
from typing import Any

from service.errors import InvalidRequest, NotSupported, PayloadTooLarge, Unprocessable
from service.validation import model_for

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
#: The media types a PATCH body may have.
MEDIA_TYPES = frozenset({JSON_PATCH, MERGE_PATCH, "application/fhir+json", "application/json",
                         "application/json+fhir"})


def apply(resource: dict[str, Any], body: Any, mimetype: str, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The resource after the patch `body` (sent as `mimetype`); `resource` itself is not changed."""
    if mimetype not in MEDIA_TYPES:
        raise InvalidRequest(f"PATCH takes {JSON_PATCH}, {MERGE_PATCH} or a FHIRPath Patch Parameters as "
                             f"application/fhir+json, not {mimetype or 'no Content-Type'!r}")
    if mimetype == JSON_PATCH or isinstance(body, list):
        patched = json_patch(resource, body, max_bytes)
    elif isinstance(body, dict) and body.get("resourceType") == "Parameters" and mimetype != MERGE_PATCH:
        patched = fhirpath_patch(resource, body)
    elif isinstance(body, dict) and mimetype != "application/fhir+json":
        patched = merge_patch(resource, body)
    else:
        raise InvalidRequest("A PATCH body is a JSON Patch array, a FHIRPath Patch Parameters resource "
                             "or a JSON Merge Patch object")
    for name in ("resourceType", "id"):
        if patched.get(name) != resource.get(name):
            raise Unprocessable(f"A patch may not change the resource's {name}", expression=name)
    return patched


# -- JSON Patch (RFC 6902) ------------------------------------------------------------------------

_OPS = {"add": ("path", "value"), "remove": ("path",), "replace": ("path", "value"), "move": ("from", "path"),
        "copy": ("from", "path"), "test": ("path", "value")}


def _pointer(text: Any, where: str) -> list[str]:
    if not isinstance(text, str) or (text and not text.startswith("/")):
        raise InvalidRequest(f"{where}: {text!r} is not a JSON Pointer", expression=where)
    return [part.replace("~1", "/").replace("~0", "~") for part in text.split("/")[1:]]


def _index(container: list[Any], token: str, pointer: str, *, append: bool = False) -> int:
    if append and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise Unprocessable(f"{pointer}: {token!r} is not an array index")
    index = int(token)
    if index > len(container) or (index == len(container) and not append):
        raise Unprocessable(f"{pointer}: index {index} is out of range")
    return index


def _parent(document: Any, parts: list[str], pointer: str) -> Any:
    node = document
    for token in parts[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, pointer)]
        else:
            raise Unprocessable(f"{pointer}: no such location in the resource")
    if not isinstance(node, (dict, list)):
        raise Unprocessable(f"{pointer}: no such location in the resource")
    return node


def _get(document: Any, parts: list[str], pointer: str) -> Any:
    if not parts:
        return document
    parent = _parent(document, parts, pointer)
    token = parts[-1]
    if isinstance(parent, list):
        return parent[_index(parent, token, pointer)]
    if token not in parent:
        raise Unprocessable(f"{pointer}: no such location in the resource")
    return parent[token]


def _add(document: Any, parts: list[str], value: Any, pointer: str) -> None:
    if not parts:
        raise Unprocessable("A patch may not replace the whole resource")
    parent = _parent(document, parts, pointer)
    if isinstance(parent, list):
        parent.insert(_index(parent, parts[-1], pointer, append=True), value)
    else:
        parent[parts[-1]] = value


def _remove(document: Any, parts: list[str], pointer: str) -> Any:
    if not parts:
        raise Unprocessable("A patch may not remove the whole resource")
    parent = _parent(document, parts, pointer)
    if isinstance(parent, list):
        return parent.pop(_index(parent, parts[-1], pointer))
    if parts[-1] not in parent:
        raise Unprocessable(f"{pointer}: no such location in the resource")
    return parent.pop(parts[-1])


def _weight(value: Any) -> int:
    """About how many bytes `value` takes as JSON, counted without recursion (any depth)."""
    total, stack = 0, [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            total += 2 + sum(len(key) + 4 for key in node)
            stack.extend(node.values())
        elif isinstance(node, list):
            total += 2 + len(node)
            stack.extend(node)
        else:
            total += len(node) + 2 if isinstance(node, str) else 8
    return total


def json_patch(resource: dict[str, Any], operations: Any, max_bytes: int | None = None) -> dict[str, Any]:
    """RFC 6902 applied to a copy of `resource`: all operations or none; copies bounded by `max_bytes`."""
    if not isinstance(operations, list):
        raise InvalidRequest("A JSON Patch document is an array of operations")
    document = copy.deepcopy(resource)
    # An upper bound of the document's size: what it held, and every copy made (added values are
    # bounded by the request body already).
    size = _weight(document) if max_bytes is not None else 0
    for number, operation in enumerate(operations):
        where = f"JSON Patch operation {number}"
        if not isinstance(operation, dict) or operation.get("op") not in _OPS:
            raise InvalidRequest(f"{where}: op must be one of {', '.join(_OPS)}", expression=f"[{number}].op")
        op = operation["op"]
        missing = [name for name in _OPS[op] if name not in operation]
        if missing:
            raise InvalidRequest(f"{where} ({op}) lacks {', '.join(missing)}", expression=f"[{number}].{missing[0]}")
        path = operation["path"]
        parts = _pointer(path, f"[{number}].path")
        if op == "add":
            _add(document, parts, copy.deepcopy(operation["value"]), path)
        elif op == "remove":
            _remove(document, parts, path)
        elif op == "replace":
            _get(document, parts, path)
            if not parts:
                raise Unprocessable("A patch may not replace the whole resource")
            parent = _parent(document, parts, path)
            key = _index(parent, parts[-1], path) if isinstance(parent, list) else parts[-1]
            parent[key] = copy.deepcopy(operation["value"])
        elif op in ("move", "copy"):
            source = _pointer(operation["from"], f"[{number}].from")
            if op == "move" and parts[:len(source)] == source and len(parts) > len(source):
                raise Unprocessable(f"{where}: cannot move {operation['from']} into its own child {path}")
            if op == "move":
                value = _remove(document, source, operation["from"])
            else:
                value = _get(document, source, operation["from"])
                if max_bytes is not None:
                    size += _weight(value)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"{where}: the patched resource would be larger than "
                                              f"{max_bytes} bytes, the most an update may send")
                value = copy.deepcopy(value)
            _add(document, parts, value, path)
        elif _get(document, parts, path) != operation["value"]:
            raise Unprocessable(f"{where}: test failed: {path} does not hold the given value")
    if not isinstance(document, dict):
        raise Unprocessable("A patch must leave a resource")
    return document


# -- JSON Merge Patch (RFC 7396) ------------------------------------------------------------------


def merge_patch(resource: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396: members of `patch` replace those of the resource, objects merge, null removes."""
    def merge(target: Any, change: Any) -> Any:
        if not isinstance(change, dict):
            return copy.deepcopy(change)
        merged = dict(target) if isinstance(target, dict) else {}
        for key, value in change.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge(merged.get(key), value)
        return merged
    return merge(resource, patch)


# -- FHIRPath Patch ---------------------------------------------------------------------------------

_STEP = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\[(\d+)\])?")
_FHIRPATH_OPS = ("add", "insert", "delete", "replace", "move")


def _steps(path: Any, resource_type: str, where: str) -> list[tuple[str, int | None]]:
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"{where}: path is required", expression=where)
    steps = []
    for part in path.split("."):
        match = _STEP.fullmatch(part.strip())
        if match is None:
            raise NotSupported(f"{where}: the FHIRPath {path!r} is not supported: only simple paths "
                               f"(Type.element[index].element) are, not {part!r}", expression=where)
        steps.append((match[1], int(match[2]) if match[2] is not None else None))
    if steps[0] != (resource_type, None):
        raise NotSupported(f"{where}: the path {path!r} must start with {resource_type}", expression=where)
    return steps[1:]


def _child_model(model: Any, name: str) -> Any:
    """The model of element `name` of `model`, when the FHIR models know it."""
    field = getattr(model, "model_fields", {}).get(name) if model is not None else None
    if field is None:
        return None
    pending = [field.annotation]
    while pending:
        kind = pending.pop()
        label = getattr(kind, "__name__", "")
        if label.endswith("Type") and label not in ("NoneType",):
            from fhir.resources.R4B import get_fhir_model_class
            try:
                return get_fhir_model_class(label[:-4])
            except (ValueError, KeyError, AttributeError):
                return None
        pending.extend(typing.get_args(kind))
    return None


def _repeats(model: Any, name: str) -> bool | None:
    field = getattr(model, "model_fields", {}).get(name) if model is not None else None
    return None if field is None else "List[" in str(field.annotation)


def _key(node: dict[str, Any], name: str) -> str | None:
    """The JSON key of element `name` in `node`: itself, or a choice element `nameType`."""
    if name in node:
        return name
    return next((k for k in node if k.startswith(name) and len(k) > len(name) and k[len(name)].isupper()), None)


Located = tuple[Any, Any, Any, Any]  # (container, key or index, value, model of value)


def _resolve(resource: dict[str, Any], steps: list[tuple[str, int | None]]) -> list[Located]:
    """The nodes a simple path selects (FHIRPath collections: a repeating element yields each item)."""
    nodes: list[Located] = [(None, None, resource, model_for(resource["resourceType"]))]
    for name, index in steps:
        found: list[Located] = []
        for _, _, value, model in nodes:
            if not isinstance(value, dict):
                continue
            key = _key(value, name)
            if key is None:
                continue
            child, child_model = value[key], _child_model(model, key)
            if isinstance(child, list):
                found.extend((child, i, item, child_model) for i, item in enumerate(child))
            else:
                found.append((value, key, child, child_model))
        nodes = found[index:index + 1] if index is not None else found
    return nodes


def _value(part: dict[str, Any], where: str) -> tuple[Any, str]:
    """The JSON value of a `value` part and its FHIR type suffix (`valueHumanName` → ("…", "HumanName"))."""
    for key, value in part.items():
        if key.startswith("value") and len(key) > 5:
            return copy.deepcopy(value), key[5:]
    if isinstance(part.get("part"), list):
        built: dict[str, Any] = {}
        for sub in part["part"]:
            name = sub.get("name") if isinstance(sub, dict) else None
            if not isinstance(name, str):
                raise InvalidRequest(f"{where}: each part of a complex value needs a name", expression=where)
            value, _ = _value(sub, where)
            if name in built:
                built[name] = [*(built[name] if isinstance(built[name], list) else [built[name]]), value]
            else:
                built[name] = value
        return built, ""
    raise InvalidRequest(f"{where}: the operation needs a value", expression=where)


def _single(nodes: list[Located], path: str, where: str) -> Located:
    if len(nodes) != 1:
        raise Unprocessable(f"{where}: the path {path!r} selects {len(nodes)} elements, not one", expression=where)
    return nodes[0]


def _list_at(resource: dict[str, Any], steps: list[tuple[str, int | None]], path: str, where: str) -> list[Any]:
    """For insert and move: the repeating element the path names (created empty if absent)."""
    if not steps or steps[-1][1] is not None:
        raise Unprocessable(f"{where}: {path!r} must name a repeating element, without an index", expression=where)
    _, _, node, model = _single(_resolve(resource, steps[:-1]), path, where)
    name = steps[-1][0]
    if not isinstance(node, dict):
        raise Unprocessable(f"{where}: {path!r} is not inside an element", expression=where)
    current = node.get(name)
    if (current is None and _repeats(model, name) is False) or (current is not None and not isinstance(current, list)):
        raise Unprocessable(f"{where}: {path!r} is not a repeating element", expression=where)
    return node.setdefault(name, [])


def _primitive(parts: dict[str, Any], name: str) -> Any:
    """The value[x] of the operation's part `name`, or None."""
    return next((v for k, v in parts.get(name, {}).items() if k.startswith("value")), None)


def _position(parts: dict[str, Any], name: str, size: int, where: str) -> int:
    value = _primitive(parts, name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= size:
        raise Unprocessable(f"{where}: {name} must be an index from 0 to {size}", expression=where)
    return value


def fhirpath_patch(resource: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """A FHIRPath Patch `Parameters` applied to a copy of `resource`: all operations or none."""
    document = copy.deepcopy(resource)
    resource_type = document["resourceType"]
    operations = parameters.get("parameter")
    if not isinstance(operations, list) or not operations:
        raise InvalidRequest("A FHIRPath Patch holds one `operation` parameter per change",
                             expression="Parameters.parameter")
    for number, operation in enumerate(operations):
        where = f"Parameters.parameter[{number}]"
        if not isinstance(operation, dict) or operation.get("name") != "operation" \
                or not isinstance(operation.get("part"), list):
            raise InvalidRequest(f"{where}: each parameter is an `operation` with parts", expression=where)
        parts: dict[str, Any] = {}
        for part in operation["part"]:
            if isinstance(part, dict) and isinstance(part.get("name"), str):
                parts[part["name"]] = part
        kind = _primitive(parts, "type")
        if kind not in _FHIRPATH_OPS:
            raise InvalidRequest(f"{where}: type must be one of {', '.join(_FHIRPATH_OPS)}, got {kind!r}",
                                 expression=f"{where}.part")
        path = _primitive(parts, "path")
        steps = _steps(path, resource_type, where)
        if kind == "add":
            name = _primitive(parts, "name")
            if not isinstance(name, str) or not _STEP.fullmatch(name) or "[" in name:
                raise InvalidRequest(f"{where}: add needs the name of the element to add", expression=where)
            _, _, node, model = _single(_resolve(document, steps), str(path), where)
            if not isinstance(node, dict):
                raise Unprocessable(f"{where}: {path!r} is not an element that can have children", expression=where)
            value, suffix = _value(parts.get("value", {}), where)
            choice = suffix and _repeats(model, name) is None and _repeats(model, name + suffix) is not None
            key = name + suffix if choice else name
            existing = node.get(key)
            if isinstance(existing, list) or (existing is None and _repeats(model, key)):
                node.setdefault(key, []).append(value)
            elif existing is None:
                node[key] = value
            else:
                raise Unprocessable(f"{where}: {path}.{name} already has a value (use replace)", expression=where)
        elif kind == "insert":
            items = _list_at(document, steps, str(path), where)
            value, _ = _value(parts.get("value", {}), where)
            items.insert(_position(parts, "index", len(items), where), value)
        elif kind == "delete":
            nodes = _resolve(document, steps)
            if not nodes:
                continue
            container, key, _, _ = _single(nodes, str(path), where)
            if container is None:
                raise Unprocessable(f"{where}: a patch may not delete the resource", expression=where)
            del container[key]
            _prune(document)
        elif kind == "replace":
            container, key, _, _ = _single(_resolve(document, steps), str(path), where)
            if container is None:
                raise Unprocessable(f"{where}: a patch may not replace the resource", expression=where)
            value, suffix = _value(parts.get("value", {}), where)
            if isinstance(container, dict) and key != steps[-1][0] and suffix:
                del container[key]  # a choice element: valueX of the new type
                key = steps[-1][0] + suffix
            container[key] = value
        else:  # move
            items = _list_at(document, steps, str(path), where)
            if not items:
                raise Unprocessable(f"{where}: {path!r} is empty", expression=where)
            source = _position(parts, "source", len(items) - 1, where)
            destination = _position(parts, "destination", len(items) - 1, where)
            items.insert(destination, items.pop(source))
    _prune(document)
    return document


def _prune(node: Any) -> None:
    """Remove the empty lists an operation left (FHIR JSON never holds `[]`)."""
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if isinstance(v, list) and not v]:
            del node[key]
        for value in node.values():
            _prune(value)
    elif isinstance(node, list):
        for item in node:
            _prune(item)
