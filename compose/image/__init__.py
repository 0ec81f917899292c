"""The study image: the reproducible OCI image a recipe pins by digest, and which digests a recipe may name.

- :mod:`compose.image.locks`: the pinned inputs (``debian.lock.json``, ``python.lock``), making and fetching them;
- :mod:`compose.image.layers`: deterministic layers from .debs, wheels and project files;
- :mod:`compose.image.build`: ``build_study_image`` (``seal image build``) and the build record;
- :mod:`compose.image.bytecode`: the image's unchecked-hash bytecode, compiled by the image's own Python;
- :mod:`compose.image.policy`: the current study image's digest, ``image_allowed`` and the API's ``ImageAllowlist``.

Errors::

    BuildError              the build failed (the message names the step; a bytecode step that cannot run the
                            image's Python, too)
    LockError               a lock file is missing or malformed, or an input does not match its pin
    LayerError              an input could not be read into a layer
    ImageNotBuilt           no build record in the state folder
    └── StaleImage          the record describes other code or locks than this checkout's
"""

from compose.image.build import (
    BUILD_RECORD,
    IMAGE_NAME,
    BuildError,
    BuildRecord,
    app_sources,
    build_study_image,
    default_cache_dir,
    default_image_dir,
    oci_archive,
)
from compose.image.layers import LayerError
from compose.image.locks import LockError, lock_debian, lock_python
from compose.image.policy import (
    PLACEHOLDER_DIGEST,
    STUDY_IMAGE_REPOSITORY,
    ImageAllowlist,
    ImageNotBuilt,
    StaleImage,
    compose_images,
    current_study_image,
    current_study_image_digest,
    image_allowed,
    read_build_record,
    study_image_reference,
)

__all__ = [
    "BUILD_RECORD",
    "IMAGE_NAME",
    "PLACEHOLDER_DIGEST",
    "STUDY_IMAGE_REPOSITORY",
    "BuildError",
    "BuildRecord",
    "ImageAllowlist",
    "ImageNotBuilt",
    "LayerError",
    "LockError",
    "StaleImage",
    "app_sources",
    "build_study_image",
    "compose_images",
    "current_study_image",
    "current_study_image_digest",
    "default_cache_dir",
    "default_image_dir",
    "image_allowed",
    "lock_debian",
    "lock_python",
    "oci_archive",
    "read_build_record",
    "study_image_reference",
]
