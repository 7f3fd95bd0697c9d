"""``wsgate objects list NAMESPACE``: the durable objects of a namespace, from the state
service.

Lists the objects that hold storage or members (an object that holds nothing does not
exist as far as listing goes), in name order, with their member counts and storage
bytes, page by page (``State.ListObjects``; any replica answers for the whole namespace).
It reaches the state service as a worker does: ``--state-address`` and the worker's
``WSGATE_STATE_TLS_*`` settings.

Output: one line per object, ``name<TAB>members<TAB>bytes<TAB>keys``, or with ``--json``
one JSON object per line (``{"name", "members", "bytes", "keys"}``). Exit status 0, 1 if
the state service refused or could not be reached (the reason on stderr), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from wsgate.config import WorkerConfig
from wsgate.errors import ConfigError, StateError

if TYPE_CHECKING:
    from wsgate.v1 import state_pb2 as pb
    from wsgate.worker.state_client import StateClient

#: The settings of the state client that the command takes from WorkerConfig.
CLIENT_SETTINGS = (
    "state_address",
    "state_timeout_s",
    "state_tls_ca",
    "state_tls_cert",
    "state_tls_key",
    "state_tls_server_name",
)
#: The command's name under ``wsgate``.
COMMAND = "objects"
#: Objects asked for per page.
PAGE = 1000


def add_objects_parser(
    sub: Any,
    environ: typing.Mapping[str, str],
    add_config_options: Callable[..., None],
) -> None:
    """``wsgate objects list NAMESPACE [--prefix P] [--json]`` (``add_config_options``:
    the CLI's flags-from-settings helper, for the state client's settings)."""
    help_text = "list the durable objects of a namespace (those with storage or members)"
    p = sub.add_parser(COMMAND, help=help_text, description=help_text)
    actions = p.add_subparsers(dest="objects_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help=help_text, description=__doc__.split("\n\n")[1])
    listing.add_argument("namespace", help="the namespace (a durable class's namespace)")
    listing.add_argument("--prefix", default="", help="only names that start with this")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add_config_options(listing, WorkerConfig, environ, only=CLIENT_SETTINGS)


def run_objects(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``wsgate objects list``."""
    # Here, not at the top: every wsgate command builds this parser, and only this one
    # needs the gRPC client.
    from wsgate.grpc_tls import client_tls

    settings = {name: getattr(args, name) for name in CLIENT_SETTINGS}
    try:
        config = dataclasses.replace(WorkerConfig(), **settings)
        tls = client_tls(config)
    except ConfigError as exc:
        parser.exit(2, f"wsgate {COMMAND}: {exc}\n")
    if not args.namespace:
        parser.exit(2, f"wsgate {COMMAND} list: a namespace is required\n")
    # The client's retries log warnings; a failure is said once, on its own line.
    logging.getLogger("wsgate").setLevel(logging.ERROR)
    return asyncio.run(_list(config, tls, args.namespace, args.prefix, args.json))


async def _list(config: WorkerConfig, tls: Any, namespace: str, prefix: str, as_json: bool) -> int:
    from wsgate.worker.state_client import StateClient

    client = StateClient(config.state_address, timeout_s=config.state_timeout_s, tls=tls)
    await client.start()
    try:
        async for summary in list_objects(client, namespace, prefix):
            usage = summary.usage
            if as_json:
                line = json.dumps(
                    {
                        "name": summary.name,
                        "members": usage.members,
                        "bytes": usage.bytes,
                        "keys": usage.keys,
                    }
                )
            else:
                line = f"{summary.name}\t{usage.members}\t{usage.bytes}\t{usage.keys}"
            sys.stdout.write(line + "\n")
    except StateError as exc:
        sys.stderr.write(f"wsgate {COMMAND} list: {exc}\n")
        return 1
    finally:
        await client.close()
    return 0


async def list_objects(
    client: StateClient, namespace: str, prefix: str = ""
) -> AsyncIterator[pb.ObjectSummary]:
    """Every object of ``namespace`` (with names starting with ``prefix``) that holds
    storage or members, in name order, fetched a page at a time."""
    from wsgate.v1 import state_pb2 as pb

    after = ""
    while True:
        page = await client.kv.list_objects(
            pb.ListObjectsRequest(namespace=namespace, prefix=prefix, after=after, limit=PAGE)
        )
        for summary in page.objects:
            yield summary
        if not page.more or not page.objects:
            return
        after = page.objects[-1].name
