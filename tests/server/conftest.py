"""Fixtures of the server tests: a PostgreSQL server for the registry's database backend."""

from __future__ import annotations

import pytest

from tests.postgres_server import fresh_database, postgres_server


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url) -> str:
    """A fresh, empty database: one registry's worth of state."""
    return fresh_database(postgres_server_url)
