"""Build the committed contract artifacts from ``contracts/src/*.sol`` (DESIGN.md §2).

    python -m contracts.compile            rewrite contracts/artifacts/<Contract>.json
    python -m contracts.compile --check    exit 1 naming every artifact that is stale or missing (CI)

The compiler is the npm ``solc`` package (solc-js) in ``tools/node_modules``, driven through standard
JSON by ``node`` with the same settings as ``contracts/foundry.toml``: EVM cancun, optimizer on, 200 runs.
Each artifact is ``{"abi", "bytecode": "0x…", "deployedBytecode": "0x…", "immutableReferences",
"storageLayout", "contractName", "solcVersion", "sourceSha256"}`` written with sorted keys, indent 1 and a
trailing newline, so that a fresh compile of unchanged sources is byte-identical. ``deployedBytecode`` is the
runtime code with zeros where the immutables go; ``immutableReferences`` maps each immutable's name to the
``[start, length]`` byte ranges it fills in that code; ``storageLayout`` is solc's storage layout, compact:
``{"storage": {variable: {"slot", "offset", "type"}}, "structs": {Struct: {member: {"slot", "offset", "type"}}}}``
(slots as integers, struct member slots relative to the struct's first). Auditors read state proofs with the
last two (contracts/storage.py). ``sourceSha256`` is the hex sha256 of the canonical JSON
``{source unit: text}`` (sorted keys, ``,``/``:`` separators, UTF-8) of the source units that contract was
compiled from — the ones its solc metadata lists — so editing one contract leaves the other's artifact fresh.

Errors: ``CompileError`` (a ``RuntimeError``) when node or solc-js is missing, or solc reports errors;
its message carries solc's own diagnostics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ARTIFACT_DIR", "CONTRACT_NAMES", "CompileError", "compile_sources", "main", "read_sources", "render_artifact"]

_CONTRACTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _CONTRACTS_DIR.parent
_SOLC_MODULE = _REPO_ROOT / "tools" / "node_modules" / "solc"
ARTIFACT_DIR = _CONTRACTS_DIR / "artifacts"
# The deployable contracts that get an artifact; other source units (IAppAuth.sol) only hold interfaces.
CONTRACT_NAMES = ("DstackApp", "DstackKms")

# Prints {"version": ..., "output": <standard JSON output string>}; compile() rather than the solcjs CLI,
# which writes non-JSON noise ("Cannot retry compilation with SMT…") onto stdout.
_NODE_SCRIPT = """
const solc = require(process.argv[1]);
const input = require("fs").readFileSync(0, "utf8");
process.stdout.write(JSON.stringify({version: solc.version(), output: solc.compile(input)}));
"""


class CompileError(RuntimeError):
    """The contracts could not be compiled (toolchain missing or solc reported errors)."""


def read_sources() -> dict[str, str]:
    """The Solidity sources as solc source units: ``{"src/<File>.sol": text}``."""
    return {
        f"src/{path.name}": path.read_text(encoding="utf-8")
        for path in sorted((_CONTRACTS_DIR / "src").glob("*.sol"))
    }


def compile_sources(sources: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Compile ``sources`` (default: :func:`read_sources`) and return ``{contract name: artifact}``.

    Source unit names are paths relative to ``contracts/`` (``src/DstackApp.sol``) so that relative
    imports resolve. Only the contracts in ``CONTRACT_NAMES`` are returned.
    """
    if sources is None:
        sources = read_sources()
    standard_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sources.items()},
        "settings": {
            "evmVersion": "cancun",
            "optimizer": {"enabled": True, "runs": 200},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "metadata", "storageLayout",
                                              "evm.deployedBytecode.object",
                                              "evm.deployedBytecode.immutableReferences"], "": ["ast"]}},
        },
    }
    version, output = _run_solc_js(json.dumps(standard_input))
    errors = [e["formattedMessage"] for e in output.get("errors", []) if e["severity"] == "error"]
    if errors:
        raise CompileError("solc reported errors:\n" + "\n".join(errors))

    artifacts: dict[str, dict] = {}
    for unit_contracts in output.get("contracts", {}).values():
        for name, compiled in unit_contracts.items():
            if name not in CONTRACT_NAMES:
                continue
            dependencies = sorted(json.loads(compiled["metadata"])["sources"])
            artifacts[name] = {
                "contractName": name,
                "abi": compiled["abi"],
                "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
                "immutableReferences": _immutable_references(
                    compiled["evm"]["deployedBytecode"].get("immutableReferences", {}), output.get("sources", {})),
                "storageLayout": _storage_layout(compiled["storageLayout"]),
                "solcVersion": version,
                "sourceSha256": _sources_sha256({unit: sources[unit] for unit in dependencies}),
            }
    missing = [name for name in CONTRACT_NAMES if name not in artifacts]
    if missing:
        raise CompileError(f"sources define no contract named {', '.join(missing)}")
    return artifacts


def render_artifact(artifact: Mapping[str, object]) -> str:
    """The artifact's file text: JSON with sorted keys, indent 1, trailing newline."""
    return json.dumps(artifact, sort_keys=True, indent=1) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the artifacts, or with ``--check`` report stale ones; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m contracts.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed artifact differs from a fresh compile")
    args = parser.parse_args(argv)

    try:
        artifacts = compile_sources()
    except CompileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stale = []
    for name, artifact in artifacts.items():
        path = ARTIFACT_DIR / f"{name}.json"
        text = render_artifact(artifact)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
                print(f"stale: {path} differs from a fresh compile", file=sys.stderr)
        else:
            ARTIFACT_DIR.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("hint: run `python -m contracts.compile` and commit the artifacts", file=sys.stderr)
        return 1
    return 0


def _run_solc_js(standard_json: str) -> tuple[str, dict]:
    try:
        completed = subprocess.run(
            ["node", "-e", _NODE_SCRIPT, str(_SOLC_MODULE)],
            input=standard_json,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as error:
        raise CompileError("node is not installed (run `make setup`)") from error
    if completed.returncode != 0:
        raise CompileError(f"solc-js failed (is {_SOLC_MODULE} installed? run `make setup`):\n{completed.stderr}")
    result = json.loads(completed.stdout)
    return result["version"], json.loads(result["output"])


def _immutable_references(references: Mapping[str, list], sources: Mapping[str, dict]) -> dict[str, list]:
    """solc's immutable references (keyed by AST id) keyed by the immutable's name: ``{name: [[start, length]]}``."""
    names: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("nodeType") == "VariableDeclaration" and node.get("mutability") == "immutable":
                names[str(node["id"])] = node["name"]
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk([unit.get("ast") for unit in sources.values()])
    return {names[ast_id]: [[ref["start"], ref["length"]] for ref in refs] for ast_id, refs in references.items()}


def _storage_layout(layout: Mapping[str, list | dict]) -> dict[str, dict]:
    """solc's storage layout without AST ids: variables and struct members by name, slots as integers."""
    types = layout.get("types") or {}

    def entry(item: Mapping[str, object]) -> dict[str, object]:
        return {"slot": int(item["slot"]), "offset": item["offset"], "type": types[item["type"]]["label"]}

    structs = {kind["label"].removeprefix("struct ").rpartition(".")[2]: {m["label"]: entry(m) for m in kind["members"]}
               for kind in types.values() if "members" in kind}
    return {"storage": {item["label"]: entry(item) for item in layout.get("storage", [])}, "structs": structs}


def _sources_sha256(sources: Mapping[str, str]) -> str:
    canonical = json.dumps(dict(sources), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
