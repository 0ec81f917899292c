"""Shared fixtures: a real anvil chain for the whole session, and fresh contracts per test."""

from __future__ import annotations

import pytest
from eth_account import Account

from contracts.chain import Chain, DstackApp, DstackKms
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil


@pytest.fixture(scope="session")
def anvil():
    with Anvil() as node:
        yield node


@pytest.fixture(scope="session")
def chain(anvil):
    with Chain(anvil.rpc_url) as connection:
        yield connection


@pytest.fixture(scope="session")
def funder():
    return Account.from_key(ANVIL_FUNDER_KEY)


@pytest.fixture
def owners(chain, funder):
    accounts = [Account.create() for _ in range(5)]
    for account in accounts:
        chain.fund(funder, account.address, 10**19)
    return accounts


@pytest.fixture
def kms_signer(chain, funder):
    account = Account.create()
    chain.fund(funder, account.address, 10**19)
    return account


@pytest.fixture
def consortium(chain, funder, owners, kms_signer) -> DstackApp:
    """A 3-of-5 DstackApp with an ε budget of 2.0, registered in a fresh DstackKms."""
    app = DstackApp.deploy(chain, funder, owners=[o.address for o in owners], threshold=3, epsilon_budget=2.0,
                           kms_signer=kms_signer.address)
    return app


@pytest.fixture
def registry(chain, funder, consortium) -> DstackKms:
    kms = DstackKms.deploy(chain, funder)
    kms.register_app(consortium.address, funder)
    return kms
