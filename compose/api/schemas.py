"""The analysts' API wire schemas (pydantic): what it accepts and what it answers. OpenAPI is generated from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compose.backends import RunState
from compose.manifest import StudyManifest

__all__ = [
    "Approval",
    "ComposeSubmission",
    "ComposeView",
    "Progress",
    "Proposal",
    "RunInput",
    "RunView",
    "SubmittedCompose",
    "TrainingProgress",
]


class ComposeSubmission(BaseModel):
    """A study compose: the analyst's docker-compose YAML and the study manifest to measure with it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the app's name in app-compose.json")
    docker_compose: str = Field(min_length=1, description="docker-compose YAML; the manifest is added to it")
    manifest: StudyManifest
    study_service: str | None = Field(default=None, description="the service that runs the study, when several")


class Approval(BaseModel):
    state: str = Field(description="not proposed | pending | allowed | revoked")
    approvals: int
    threshold: int
    owners: list[str]
    approvers: list[str]
    uri: str
    epsilon_budget: float
    epsilon_spent: float
    epsilon_remaining: float


class Proposal(BaseModel):
    tx: str
    block: int
    proposer: str
    uri: str


class ComposeView(BaseModel):
    compose_hash: str = Field(description="sha256 of app_compose's UTF-8 bytes, 64 hex")
    app_id: str = Field(description="the DstackApp contract address")
    app_compose_url: str
    approval: Approval
    name: str | None = Field(default=None, description="the app's name in app-compose.json")


class SubmittedCompose(ComposeView):
    app_compose: str = Field(description="app-compose.json verbatim: hash exactly these bytes (UTF-8)")
    proposal: Proposal


class RunInput(BaseModel):
    file: str = Field(description="the uploaded file's name, as the analyst gave it")
    bytes: int
    owner: str = Field(description="the data owner who sealed and signed it")
    ciphertext_sha256: str = Field(description="the sealed payload's digest, as the receipt will list it")


class Progress(BaseModel):
    state: str
    at: float = Field(description="Unix time the run entered this state")


class TrainingProgress(BaseModel):
    epochs_done: int = Field(description="epochs the CVM has reported finished so far")
    epochs: int = Field(description="the epochs the manifest asks for")


class RunView(BaseModel):
    run_id: str
    compose_hash: str
    state: RunState
    reason: str | None = Field(description="why the run failed (the refusal), when it did")
    progress: list[Progress]
    inputs: list[RunInput]
    simulated: bool = Field(description="true: the CVM runs on the SIMULATED TDX platform")
    isolated: bool
    isolation: str
    result_url: str | None
    training: TrainingProgress | None = Field(default=None, description="a DP-SGD run's epochs done of the "
                                              "manifest's epochs; null for other analyses")
