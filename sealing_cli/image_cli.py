"""`seal image …`: build the reproducible study image and show the digest recipes pin (logic in `compose.image`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from compose.stack_file import default_state_dir
from sealing_cli.common import EXIT_REFUSED, EXIT_UNREACHABLE, JsonFlag, StateDir, fail, out

image_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="The study image: build it reproducibly, show its digest, re-pin its inputs.")


def _image_dir(state_dir: Path | None, out_dir: Path | None) -> Path:
    from compose.image import default_image_dir

    return Path(out_dir) if out_dir else default_image_dir(state_dir or default_state_dir())


@image_app.command("build")
def build(
    state_dir: StateDir = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: STATE/study-image)")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache", help="Download and layer cache (default: "
                                                      "$SEALROOM_CACHE or ~/.cache/sealroom)")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild every layer from the verified inputs "
                                          "instead of reusing cached layers")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build sealroom/study-runner from this repository and its lock files; print its digest and inputs."""
    from compose.image import BuildError, LayerError, LockError, build_study_image

    target = _image_dir(state_dir, out_dir)
    log = (lambda message: None) if as_json else (lambda message: out.print(escape(message), highlight=False))
    try:
        record = build_study_image(target, cache_dir=cache_dir, layer_cache=not rebuild, log=log)
    except LockError as error:
        fail(str(error), EXIT_UNREACHABLE if "download" in str(error) else EXIT_REFUSED)
    except (BuildError, LayerError) as error:
        fail(str(error), EXIT_REFUSED)
    if as_json:
        out.print_json(json.dumps(record.document))
        return
    inputs = record.document["inputs"]
    out.print(f"digest:    {record.digest}")
    out.print(f"reference: {record.reference}")
    out.print(f"image id:  {record.config_digest}")
    out.print(f"inputs:    debian.lock.json sha256 {inputs['debian_lock_sha256']} ({inputs['debian_packages']} "
              f"packages), python.lock sha256 {inputs['python_lock_sha256']} ({inputs['wheels']} wheels), app tree "
              f"sha256 {inputs['app_tree_sha256']} ({len(inputs['app_files'])} files), SOURCE_DATE_EPOCH "
              f"{inputs['source_date_epoch']}")
    out.print(f"layout:    {record.layout}")
    out.print(f"record:    {record.record_path}")


@image_app.command("digest")
def digest(state_dir: StateDir = None,
           out_dir: Annotated[Optional[Path], typer.Option("--out", help="Image folder (default: "
                                                           "STATE/study-image)")] = None) -> None:
    """Print the reference a recipe pins (sealroom/study-runner@sha256:…); fails when the image is stale."""
    from compose.image import ImageNotBuilt, current_study_image, read_build_record

    folder = _image_dir(state_dir, out_dir)
    try:
        if out_dir:
            from compose.image import study_image_reference
            reference = study_image_reference(read_build_record(folder)["digest"])
        else:
            reference = current_study_image(state_dir or default_state_dir())
    except ImageNotBuilt as error:
        fail(str(error), EXIT_REFUSED, "run `seal image build`")
    print(reference)


@image_app.command("lock")
def lock() -> None:
    """Re-pin the image's inputs: resolve the Debian base and the wheels today and rewrite the lock files."""
    from compose.image import LockError, lock_debian, lock_python
    from compose.image.locks import DEBIAN_LOCK, PYTHON_LOCK

    try:
        debs = lock_debian()
        wheels = lock_python(Path(__file__).resolve().parents[1] / "pyproject.toml")
    except LockError as error:
        fail(str(error), EXIT_UNREACHABLE)
    out.print(f"{DEBIAN_LOCK}: {len(debs)} Debian packages\n{PYTHON_LOCK}: {len(wheels)} wheels")
