"""Fixtures shared with the hub tests: simulated ORES-HTTP modules."""

from tests.hub.conftest import ores_module  # noqa: F401  (re-exported fixture)
