"""The analysts' REST API: submit a study compose, follow its approval, run it, fetch the signed result.

docs/design.md §6 steps 1 and 3. OpenAPI is served at ``/openapi.json`` (and ``/docs``)::

    POST /composes                          docker-compose YAML + study manifest -> app-compose.json, compose hash,
                                            and the on-chain proposal the API makes with its own account
    GET  /composes/{hash}                   the compose's approval state, read from the DstackApp contract
    GET  /composes/{hash}/app-compose.json  the verbatim measured bytes; public, since this URL is the URI proposed
                                            on-chain for the owners to review
    POST /composes/{hash}/runs              start a run on an allowed compose: multipart upload of the sealed files
    GET  /composes                          every compose submitted to this API, with its approval state
    GET  /runs                              the analyst's own runs, newest first
    GET  /runs/{run_id}                     state, progress (stages; epochs for DP-SGD), isolation, refusal reason
    GET  /runs/{run_id}/result              attestation.json verbatim (it holds the Sign-RPC envelope), once done

Every other route needs ``Authorization: Bearer <token>`` with a token from ``compose.auth.issue_token``; anyone
else gets 401. A run belongs to the analyst who started it; others get 404 for it.

A run goes ``queued -> booting`` (the CVM's agent measures the recipe and gets its app key from the KMS)
``-> running`` (unwrap, analysis) ``-> signing -> done``, or ``failed`` with the reason (a KMS or chain refusal,
the output gate, a timeout). A compose that the chain does not allow (pending, revoked) never starts: 409 with
the contract's own reason. Runs execute one at a time in a background thread; they are kept in memory (a
restarted API forgets them; their folders stay under ``runs/``).

The local backend runs on SIMULATED TDX: run views say ``"simulated": true``, result responses carry
``X-Sealroom-Simulated: true`` and the receipt itself says ``"simulated": true``.

Status codes: 400 a body or a docker-compose YAML nested deeper than 64 levels; 401 not an analyst; 404 unknown
compose or run; 409 the chain refuses (already proposed, pending, revoked) or the result is not ready; 413 a body
over its route's cap (1 MiB for a compose; ``--max-upload-bytes`` for a run's sealed files, which are streamed to
disk as they arrive); 422 an invalid request (bad YAML, manifest, file count; the answer never repeats the
request's values); 503 the chain is unreachable.

    python -m compose.api --stack-state-dir DIR --port PORT --proposer-keystore FILE [--state-dir DIR/api]
                          [--backend container|process] [--engine-url unix://…] [--image-digest sha256:… …]

reads the local stack's description (``stack.json``) and the proposer keystore's password from
``SEALROOM_API_PROPOSER_PASSWORD``. Runs go to the container backend (a container of the study image the compose
pins, on the engine at ``--engine-url``, which the stack started) or the ``process`` fallback
(``compose.backends.choice``). A compose is proposed only if its services name ``sealroom/study-runner`` by an
allowed digest: ``--image-digest`` (repeatable), else the study image built in ``DIR/study-image`` (422 otherwise).

Layout: ``app`` (configuration, ``create_app``), ``composes`` and ``runs`` (the routes, as APIRouters),
``deps`` (the shared state and the dependencies the routes declare), ``schemas`` (the wire models), ``queue``
(runs in the background), ``uploads`` (streaming the sealed files to disk), ``serve`` (``python -m compose.api``).
"""

from compose.api.app import ApiConfig, create_app
from compose.api.schemas import (
    Approval,
    ComposeSubmission,
    ComposeView,
    Progress,
    Proposal,
    RunInput,
    RunView,
    SubmittedCompose,
    TrainingProgress,
)
from compose.api.serve import PROPOSER_PASSWORD_ENV, main

__all__ = [
    "PROPOSER_PASSWORD_ENV",
    "ApiConfig",
    "Approval",
    "ComposeSubmission",
    "ComposeView",
    "Progress",
    "Proposal",
    "RunInput",
    "RunView",
    "SubmittedCompose",
    "TrainingProgress",
    "create_app",
    "main",
]
