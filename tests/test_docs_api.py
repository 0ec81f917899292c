"""docs/api.md cannot drift from the analysts' API: it documents exactly the endpoints the live OpenAPI document
serves, each with its auth (bearer or none, as the API declares it) and its errors."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from eth_account import Account

from compose.api import ApiConfig, create_app

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_HEADING = re.compile(r"^### `(GET|POST|PUT|PATCH|DELETE) (/[^`]*)`\s*$", re.M)


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    """The OpenAPI document as the API serves it at /openapi.json (no chain or backend is touched to serve it)."""
    app = create_app(ApiConfig(state_dir=tmp_path_factory.mktemp("api"), public_url="http://127.0.0.1:1",
                               study=None, proposer=Account.create(),
                               backend=SimpleNamespace(isolation=None, simulated=True)))

    async def fetch() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            reply = await client.get("/openapi.json")
            reply.raise_for_status()
            return reply.json()

    return asyncio.run(fetch())


def _operations(openapi: dict) -> dict[tuple[str, str], dict]:
    return {(method.upper(), path): operation for path, item in openapi["paths"].items()
            for method, operation in item.items()}


def _sections() -> dict[tuple[str, str], str]:
    text = DOC.read_text()
    sections = {}
    for heading in _HEADING.finditer(text):
        ends = [text.find(mark, heading.end()) for mark in ("\n### ", "\n## ")]
        sections[(heading.group(1), heading.group(2))] = text[heading.end():min([e for e in ends if e != -1],
                                                                                 default=len(text))]
    return sections


def test_docs_and_openapi_list_the_same_endpoints(openapi):
    served, documented = set(_operations(openapi)), set(_sections())
    assert served - documented == set(), f"served but not in docs/api.md: {sorted(served - documented)}"
    assert documented - served == set(), f"in docs/api.md but not served: {sorted(documented - served)}"


def test_each_endpoint_documents_its_auth_as_the_api_declares_it(openapi):
    sections = _sections()
    for key, operation in _operations(openapi).items():
        auth = re.search(r"^\*\*Auth:\*\* (.*)$", sections[key], re.M)
        assert auth, f"{key}: no **Auth:** line"
        bearer = any("HTTPBearer" in requirement for requirement in operation.get("security", []))
        assert ("bearer" in auth.group(1)) is bearer, f"{key}: the API {'needs' if bearer else 'needs no'} a token"


def test_each_endpoint_documents_its_errors(openapi):
    sections = _sections()
    table = DOC.read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    explained = {int(code) for code in re.findall(r"^\| (\d{3}) \|", table, re.M)}
    for key, operation in _operations(openapi).items():
        errors = re.search(r"^\*\*Errors:\*\* (.*?)(?:\n\n|\Z)", sections[key], re.M | re.S)
        assert errors, f"{key}: no **Errors:** line"
        codes = {int(code) for code in re.findall(r"\b([45]\d\d)\b", errors.group(1))}
        declared = {int(code) for code in operation["responses"] if code[0] in "45"}
        assert declared <= codes, f"{key}: the API declares {sorted(declared - codes)}, undocumented"
        assert codes <= explained, f"{key}: {sorted(codes - explained)} are not in the errors table"
        bearer = bool(operation.get("security"))
        assert (401 in codes) is bearer, f"{key}: 401 goes with the bearer token"
