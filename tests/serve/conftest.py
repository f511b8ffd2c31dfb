"""Fixtures of the server tests: the built-in model loaded once, and apps over it."""

import pytest
from fastapi.testclient import TestClient

import fewstep
from fewstep.serve.app import create_app


@pytest.fixture(scope="session")
def pipe():
    """The built-in shapes-turbo pipeline (128x128, LCM, 4 steps), shared by every app of the test run."""
    return fewstep.load()


@pytest.fixture
def make_client(pipe):
    """TestClients of apps over `pipe` with the given create_app options; server errors come back as 500s."""
    def make(**options):
        return TestClient(create_app(pipe, **options), raise_server_exceptions=False)
    return make


@pytest.fixture
def client(make_client):
    return make_client()
