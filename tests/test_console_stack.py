"""`seal up`'s stack starts the owners' console on loopback beside the analysts' API (`LocalStack.start_console`):
its URL is in stack.json, and it serves the composes the API stored, with the owners' names."""

from __future__ import annotations

import hashlib

import httpx

from compose.auth import issue_token
from compose.stack_file import StackDescription
from console.app import CSP
from tests.study_world import SITES, STATS_PARAMS, YAML, start_study_stack


def test_the_stack_serves_the_console_with_the_apis_composes(tmp_path):
    with start_study_stack(tmp_path / "state") as stack:
        api_url = stack.start_api()
        console_url = stack.start_console()
        d = StackDescription.load(stack.state_dir)
        assert d.services["console"]["url"] == console_url and console_url.startswith("http://127.0.0.1:")
        owners = {o.name: o.address for o in d.owners}
        token = issue_token(stack.state_dir / "api", "alice")
        manifest = {"study": "console-stack", "inputs": [{"owner": owners[n], "name": s} for n, s in SITES.items()],
                    "analysis": {"kind": "dp_stats", "params": STATS_PARAMS}, "epsilon": 1.0, "delta": 1e-6,
                    "output_type": "aggregate_stats"}
        reply = httpx.post(f"{api_url}/composes", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                           json={"name": "console-stack", "docker_compose": YAML, "manifest": manifest})
        assert reply.status_code == 201, reply.text
        h = reply.json()["compose_hash"]
        with httpx.Client(base_url=console_url, timeout=30) as console:
            page = console.get("/")
            assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
            recipes = console.get("/api/recipes").json()
            assert [r["compose_hash"] for r in recipes] == ["0x" + h.removeprefix("0x")]
            assert recipes[0]["state"] == "proposed" and recipes[0]["name"] == "console-stack"
            info = console.get("/api/consortium").json()
            assert {o["name"] for o in info["owners"]} == set(owners) and info["relay"] is True
            body = console.get(f"/api/recipes/{h}/app-compose.json").content
            assert hashlib.sha256(body).hexdigest() == h.removeprefix("0x")
