"""End-to-end test of the Matter bridge against a real Matter controller (python-matter-server, CHIP SDK),
with the bridge and the controller in two network namespaces; needs root (skipped otherwise, failed on CI)."""
