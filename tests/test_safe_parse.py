"""The shared parsing guards (compose.safe_parse) and request limits (compose.http_limits), in process.

tests/test_no_crash.py sends the same inputs to the real services; this file pins the helpers' edges."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from pydantic import BaseModel

from compose.http_limits import BodyLimit, guard
from compose.safe_parse import (
    MAX_NESTING,
    JsonTooDeep,
    TooDeeplyNested,
    YamlTooDeep,
    json_nesting,
    load_yaml,
    loads,
)


@pytest.mark.parametrize(("document", "depth"), [
    ("3", 0),
    ("[]", 1),
    ('{"a": [1, {"b": []}]}', 4),
    ('["[[[[", "]]]]]]]", "{{{{"]', 1),                     # brackets in strings do not nest
    (r'["\"[[[[", "\\", [[]]]', 3),                          # nor after escaped quotes and backslashes
    ('"unterminated [[[[', 0),
    ("[[]][[[]]]", 3),                                      # invalid, but never deeper than the decoder would go
])
def test_json_nesting_counts_only_the_brackets_the_decoder_nests_on(document, depth):
    assert json_nesting(document) == depth
    assert json_nesting(document.encode("utf-16")) == depth


def test_loads_refuses_one_level_past_the_limit_before_decoding():
    assert loads("[" * MAX_NESTING + "]" * MAX_NESTING) is not None
    with pytest.raises(JsonTooDeep, match=f"nested deeper than {MAX_NESTING} levels") as refused:
        loads("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1))
    # Callers that refuse bad JSON, and callers that refuse bad values, both refuse it.
    assert isinstance(refused.value, json.JSONDecodeError) and isinstance(refused.value, TooDeeplyNested)
    assert str(refused.value) == f"the JSON is nested deeper than {MAX_NESTING} levels"


def test_loads_passes_its_arguments_to_json_loads():
    with pytest.raises(ValueError, match="repeats"):
        loads('{"a": 1, "a": 2}', object_pairs_hook=lambda pairs: (_ for _ in ()).throw(ValueError("repeats")))
    assert loads(b'{"a": [1]}') == {"a": [1]}


@pytest.mark.parametrize("document", ["[" * 1_000_000, '{"a":' * 200_000, "[]" * 500_000])
def test_a_megabyte_of_brackets_is_judged_quickly(document):
    start = time.perf_counter()
    with pytest.raises(json.JSONDecodeError):
        loads(document)
    assert time.perf_counter() - start < 5


COMPOSE = """
x-common: &common
  restart: "no"
  environment: {A: "1"}
services:
  study:
    <<: *common
    image: sealroom/study
    command: ["python", "-m", "study"]
"""


def test_load_yaml_reads_what_safe_load_reads():
    assert load_yaml(COMPOSE) == yaml.safe_load(COMPOSE)


@pytest.mark.parametrize("document", [
    "a: " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
    "".join(f"{' ' * i}k{i}:\n" for i in range(MAX_NESTING + 1)) + " " * (MAX_NESTING + 1) + "v",
    "- " * (MAX_NESTING + 1) + "x",
    # anchors reused at depth: each alias counts as deep as what its anchor holds
    "a0: &a0 [[[[[[[[1]]]]]]]]\n" + "".join(f"a{i}: &a{i} [[[[[[[[*a{i - 1}]]]]]]]]\n" for i in range(1, 9)),
])
def test_load_yaml_refuses_one_level_past_the_limit(document):
    with pytest.raises(YamlTooDeep):
        load_yaml(document)
    assert issubclass(YamlTooDeep, yaml.YAMLError) and issubclass(YamlTooDeep, TooDeeplyNested)


def test_load_yaml_stops_a_50_000_deep_document_early():
    start = time.perf_counter()
    with pytest.raises(YamlTooDeep):
        load_yaml("services: " + "[" * 50_000 + "]" * 50_000)
    assert time.perf_counter() - start < 5


def test_load_yaml_accepts_the_limit_itself():
    depth = MAX_NESTING - 1   # under the top-level mapping
    assert load_yaml("a: " + "[" * depth + "]" * depth) is not None


# --- compose.http_limits on a small app -------------------------------------------------------------------------

class Item(BaseModel):
    name: str
    size: int


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/items")
    def add(item: Item) -> dict:
        return {"ok": item.name}

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    limits = {"/items": BodyLimit(1024), "/upload": BodyLimit(4096, streamed=True)}
    return guard(app, lambda _method, path: limits.get(path, BodyLimit(64)),
                 error_body=lambda status, message: {"error": message, "status": status})


@pytest.fixture(scope="module")
def client():
    """The small app behind a real uvicorn on loopback (as the services run), from a background thread."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(small_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as http:
        yield http
    server.should_exit = True
    thread.join(timeout=10)


def test_a_body_within_its_cap_goes_through(client):
    assert client.post("/items", json={"name": "a", "size": 1}).json() == {"ok": "a"}
    assert client.post("/upload", content=b"\xff" * 4096).json() == {"bytes": 4096}


def test_a_declared_length_over_the_cap_is_a_413_in_the_services_shape(client):
    answer = client.post("/items", content=b"x" * 2000, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.headers["connection"] == "close"
    assert answer.json() == {"error": "the request body has 2000 bytes; this route takes at most 1024 bytes",
                             "status": 413}


def test_a_chunked_body_over_the_cap_is_a_413(client):
    answer = client.post("/items", content=iter([b"x" * 600, b"x" * 600]))
    assert answer.status_code == 413 and "over 1024 bytes" in answer.json()["error"]


def test_a_streamed_route_gets_a_413_once_its_cap_is_passed(client):
    answer = client.post("/upload", content=iter([b"x" * 4000, b"x" * 4000]))
    assert answer.status_code == 413 and "over 4096 bytes" in answer.json()["detail"]


def test_a_body_nested_too_deep_is_a_400_before_any_decoding(client):
    answer = client.post("/items", content=b"[" * 1000, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json() == {"error": f"the request body nests deeper than {MAX_NESTING} levels", "status": 400}


def test_a_422_keeps_type_location_and_message_but_not_the_input(client):
    answer = client.post("/items", json={"name": "secret-value", "size": "secret-size", "secret" * 20: 1})
    assert answer.status_code == 422
    assert "secret-value" not in answer.text and "secret-size" not in answer.text
    assert answer.json()["detail"] == [{"type": "int_parsing", "loc": ["body", "size"],
                                        "msg": "Input should be a valid integer, unable to parse string as an "
                                               "integer"}]
