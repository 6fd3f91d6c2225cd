"""A real multi-node Ray cluster on this machine for the tests, started apart from oodlab, bound to 127.0.0.1.

    RAY_TMPDIR=/tmp/rc1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \\
    python tests/local_ray_cluster.py --nodes 2 --port PORT --dashboard-port PORT2 --resources '{"train_slot": 1}'

ray.cluster_utils.Cluster runs each node as its own raylet; the head also runs the GCS and (with --dashboard-port)
the dashboard and job server. Prints `READY <gcs address> <node id> ...` once every node is up, and shuts them down on SIGTERM
or at the end of stdin. Node drills, one command per stdin line: `remove` kills every process of the newest worker node
(SIGKILL, as a lost machine) and prints `REMOVED <node id>`; `add` starts a new worker node and prints `ADDED <node id>`.
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes every Ray process (job drivers and the dashboard's agents too) use
127.0.0.1: otherwise Ray swaps 127.0.0.1 for the machine's routable address (ray._private.services
.resolve_ip_for_localhost), and `ray start --node-ip-address 127.0.0.1` does the same. RAY_ADDRESS, set here for
every process of the cluster, keeps Ray's state API calls (Ray Train's placement-group cleaner makes them) on this
cluster: without it they pick the newest Ray instance on the machine, which need not be this one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys

from ray._private.node import Node
from ray.cluster_utils import Cluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each node")
    parser.add_argument("--resources", default="{}", help="custom resources of each node (JSON)")
    parser.add_argument("--port", type=int, required=True, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, help="start the dashboard and job server on this port")
    args = parser.parse_args()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{args.port}"
    node = {"node_ip_address": "127.0.0.1", "num_cpus": args.cpus, "resources": json.loads(args.resources),
            "object_store_memory": 200 * 2**20}
    dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": args.dashboard_port,
                 "dashboard_agent_listen_port": 0} if args.dashboard_port else {"include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "gcs_server_port": args.port, **dashboard})
    # every node its own temp folder, as on separate machines: with one shared folder, the job's working directory
    # (the driver's cwd on the head, unpacked there by each node) vanished mid-job (os.getcwd() raised ENOENT)
    added = itertools.count(1)

    def add_node() -> Node:
        return cluster.add_node(**node, temp_dir=f"{os.environ['RAY_TMPDIR']}/n{next(added)}")

    nodes = [cluster.head_node] + [add_node() for _ in range(1, args.nodes)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print("READY", cluster.address, *(n.node_id for n in nodes), flush=True)
        for command in sys.stdin:
            if command.strip() == "remove" and len(nodes) > 1:
                gone = nodes.pop()
                cluster.remove_node(gone, allow_graceful=False)
                print("REMOVED", gone.node_id, flush=True)
            elif command.strip() == "add":
                nodes.append(add_node())
                print("ADDED", nodes[-1].node_id, flush=True)
            else:
                print("ERROR unknown command or no worker node:", command.strip(), flush=True)
    finally:  # SIGKILL, as `remove`: a graceful stop of every process took about 30 s after a node drill
        for node in [*cluster.worker_nodes, cluster.head_node]:
            cluster.remove_node(node, allow_graceful=False)


if __name__ == "__main__":
    main()
