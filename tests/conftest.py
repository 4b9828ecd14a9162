"""Shared fixtures live in tests/fixtures/; they start real servers, never mocks."""

pytest_plugins = [
    "tests.fixtures.pgcluster",
    "tests.fixtures.s3server",
]
