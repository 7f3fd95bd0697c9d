"""Load and chaos tests: the whole cluster in containers (testcontainers), under mixed load
from the host, while parts of it die. ``./scripts/load`` runs the scenarios and writes their
figures; ``test_cluster.py`` runs a short version in the suite. See docs/load-testing.md."""
