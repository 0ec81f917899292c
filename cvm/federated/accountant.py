"""Privacy accounting across rounds: pure maths over a small immutable state.

Spec: DESIGN.md §7 ("ε spent and left"). Each round releases one Gaussian mechanism whose noise std is
``noise_multiplier × L2 sensitivity`` (``dp``). Every eligible site's update enters every round, so the
sampling rate is 1 and Opacus's Rényi-DP accountant (Mironov 2017, "Rényi Differential Privacy"; Mironov,
Talwar and Zhang 2019 for the sampled Gaussian) gives ``α / (2 z²)`` per round at order α; rounds add up
and the total converts to (ε, δ) at the contract's δ. We call Opacus's pure analysis functions
(``opacus.accountants.analysis.rdp``) over the orders its ``RDPAccountant`` uses, with the history in the
same form as that accountant's ``history``, so a fresh ``RDPAccountant`` stepped the same way agrees.

The state lives apart from the maths, like Opacus's accountants: a frozen record of the history and the
last round charged, passed in and returned by ``run_round``; the caller stores it (it holds no secrets).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt

from cvm.federated.errors import PrivacyBudgetExhausted
from cvm.federated.round_contract import RoundContract

SAMPLE_RATE = 1.0
_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


class AccountantState(BaseModel):
    """What the accountant remembers: ``history`` as Opacus keeps it, ``(noise_multiplier, sample_rate,
    steps)`` runs, and the last round charged (rounds must increase)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal["sealroom-fed-accountant/v1"] = "sealroom-fed-accountant/v1"
    history: tuple[tuple[StrictFloat, StrictFloat, StrictInt], ...] = ()
    last_round: StrictInt = 0


def epsilon_spent(state: AccountantState, delta: float) -> float:
    """ε at ``delta`` for everything in ``state.history`` (0 for an empty history)."""
    if not state.history:
        return 0.0
    total = sum(
        rdp.compute_rdp(q=sample_rate, noise_multiplier=multiplier, steps=steps, orders=list(_ORDERS))
        for multiplier, sample_rate, steps in state.history
    )
    with warnings.catch_warnings():
        # Opacus warns when the best order is the first or last of its orders: the ε is then a valid but
        # loose upper bound. We keep Opacus's orders so the figure equals RDPAccountant's.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        epsilon, _ = rdp.get_privacy_spent(orders=list(_ORDERS), rdp=total, delta=delta)
    return float(epsilon)


def charged(state: AccountantState, round_number: int, noise_multiplier: float) -> AccountantState:
    """The state after one more Gaussian release with ``noise_multiplier`` at sampling rate 1.

    Consecutive runs with the same multiplier merge into one entry, as ``RDPAccountant.step`` does.
    """
    history = list(state.history)
    if history and history[-1][0] == noise_multiplier and history[-1][1] == SAMPLE_RATE:
        multiplier, sample_rate, steps = history.pop()
        history.append((multiplier, sample_rate, steps + 1))
    else:
        history.append((float(noise_multiplier), SAMPLE_RATE, 1))
    return AccountantState(history=tuple(history), last_round=round_number)


@dataclass(frozen=True)
class RoundSpend:
    """The ε of one planned round: before it, for it alone, after it, and what the contract leaves after it."""

    before: float
    this_round: float
    after: float
    left: float
    state_after: AccountantState


def plan_round(state: AccountantState, contract: RoundContract) -> RoundSpend:
    """Charge the contract's round against the budget, or raise :class:`PrivacyBudgetExhausted`.

    Depends only on public parameters (the noise multiplier and the rounds already run), never on the
    updates, so it runs before the aggregator looks at any of them.
    """
    if not isinstance(state, AccountantState):
        raise TypeError("accountant_state must be an AccountantState")
    if contract.round <= state.last_round:
        raise ValueError(f"round {contract.round} is not after the last round charged ({state.last_round})")
    before = epsilon_spent(state, contract.delta)
    state_after = charged(state, contract.round, contract.noise_multiplier)
    after = epsilon_spent(state_after, contract.delta)
    if after - before > contract.epsilon_per_round:
        raise PrivacyBudgetExhausted(
            "epsilon_per_round", f"this round would spend ε = {after - before:.6g} > {contract.epsilon_per_round:g}"
        )
    if after > contract.epsilon_total:
        raise PrivacyBudgetExhausted(
            "epsilon_total", f"the total would reach ε = {after:.6g} > {contract.epsilon_total:g}"
        )
    return RoundSpend(before, after - before, after, contract.epsilon_total - after, state_after)
