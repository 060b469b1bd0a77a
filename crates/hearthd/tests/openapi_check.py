#!/usr/bin/env python3
"""Checks HTTP exchanges with hearthd against the OpenAPI document (openapi.json).

Used by the Rust tests (tests/common/contract.rs), which spawn it with an argument vector:

    python3 openapi_check.py OPENAPI_JSON < exchanges.json

stdin is a JSON array of exchanges:

    {"label": "...", "method": "GET", "url": "/v1/vms/x/files?path=/etc/hostname",
     "request_content_type": "application/json" | null, "request_body": <JSON text> | null,
     "request_valid": true, "status": 200, "content_type": "application/json" | null,
     "body": "<response body as text>"}

For each one it finds the operation (method and path template), then:
- unless request_valid is false (a test that sends a bad request on purpose): every query
  parameter is documented and matches its schema, every required one is there, and the JSON
  request body matches the operation's request schema;
- always: the status is documented for the operation, the response's media type is one it
  documents for that status, and a JSON (or newline-delimited JSON) body matches the schema.

Prints one line per problem and exits 1 when there is any; exits 0 quietly otherwise.
Needs openapi-schema-validator (PyPI; scripts/install-deps.sh installs it).
"""

import json
import sys
from urllib.parse import parse_qs, urlsplit

from openapi_schema_validator import OAS31Validator, oas31_format_checker


def find_operation(doc, method, path):
    """The (template, operation) whose template matches path; literal segments win."""
    segments = path.strip("/").split("/")
    best = None
    for template, ops in doc["paths"].items():
        tsegs = template.strip("/").split("/")
        if len(tsegs) != len(segments):
            continue
        literal = 0
        for t, s in zip(tsegs, segments):
            if t.startswith("{") and t.endswith("}"):
                if not s:
                    break
            elif t == s:
                literal += 1
            else:
                break
        else:
            op = ops.get(method.lower())
            if op is not None and (best is None or literal > best[0]):
                best = (literal, template, op)
    return (best[1], best[2]) if best else (None, None)


def schema_errors(doc, schema, instance):
    # The operation's schema is checked inside a root that holds the document's components, so
    # its "#/components/schemas/..." references resolve.
    root = {"components": doc.get("components", {}), "allOf": [schema]}
    validator = OAS31Validator(root, format_checker=oas31_format_checker)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def query_value(schema, text):
    """A query string value as the JSON value its schema describes."""
    types = schema.get("type", "string")
    types = types if isinstance(types, list) else [types]
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            return text
    if "boolean" in types and text in ("true", "false"):
        return text == "true"
    return text


def media(content_type):
    return (content_type or "").split(";")[0].strip().lower()


def check(doc, ex):
    problems = []
    method, url = ex["method"], ex["url"]
    parts = urlsplit(url)
    template, op = find_operation(doc, method, parts.path)
    if op is None:
        return [f"{method} {parts.path}: no such operation in the document"]
    where = f"{method} {template}"

    if ex.get("request_valid", True):
        params = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        query = parse_qs(parts.query, keep_blank_values=True)
        for name, values in query.items():
            if name not in params:
                problems.append(f"{where}: query parameter {name!r} is not documented")
                continue
            schema = params[name].get("schema", {})
            for v in values:
                for e in schema_errors(doc, schema, query_value(schema, v)):
                    problems.append(f"{where}: query parameter {name}={v!r}: {e}")
        for name, p in params.items():
            if p.get("required") and name not in query:
                problems.append(f"{where}: required query parameter {name!r} is missing")
        body = ex.get("request_body")
        if body is not None:
            content = op.get("requestBody", {}).get("content", {})
            mt = media(ex.get("request_content_type"))
            if mt not in content:
                problems.append(
                    f"{where}: request media type {mt!r} is not documented ({sorted(content)})"
                )
            elif mt == "application/json":
                try:
                    value = json.loads(body)
                except ValueError as e:
                    problems.append(f"{where}: request body is not JSON: {e}")
                else:
                    for e in schema_errors(doc, content[mt].get("schema", {}), value):
                        problems.append(f"{where}: request body: {e}")
        elif op.get("requestBody", {}).get("required"):
            problems.append(f"{where}: the required request body is missing")

    status = str(ex["status"])
    responses = op.get("responses", {})
    response = responses.get(status) or responses.get(status[0] + "XX")
    if response is None:
        problems.append(
            f"{where}: status {status} is not documented (documented: {', '.join(responses)});"
            f" body: {ex.get('body', '')[:300]}"
        )
        return problems
    content = response.get("content", {})
    body = ex.get("body", "")
    if not content:
        if body:
            problems.append(f"{where}: status {status} documents no body, got {body[:200]!r}")
        return problems
    mt = media(ex.get("content_type"))
    if mt not in content:
        problems.append(
            f"{where}: status {status} with media type {mt!r}, documented: {sorted(content)}"
        )
        return problems
    schema = content[mt].get("schema", {})
    if mt == "application/json":
        docs = [body]
    elif mt == "application/x-ndjson":
        docs = [line for line in body.split("\n") if line]
    else:
        return problems
    for i, text in enumerate(docs):
        try:
            value = json.loads(text)
        except ValueError as e:
            problems.append(f"{where}: {status} body part {i} is not JSON ({e}): {text[:200]!r}")
            continue
        for e in schema_errors(doc, schema, value):
            problems.append(f"{where}: {status} body: {e}")
    return problems


def main():
    if len(sys.argv) != 2:
        print("usage: openapi_check.py OPENAPI_JSON < exchanges.json", file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    exchanges = json.load(sys.stdin)
    failed = False
    for ex in exchanges:
        for problem in check(doc, ex):
            failed = True
            print(f"[{ex.get('label', '?')}] {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
