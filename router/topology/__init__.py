"""Per-cluster topology: which node is primary, which replicas are healthy, how far behind.

cluster.py holds the states and the rules (pure); monitor.py the background task that samples
the nodes with asyncpg and feeds them in.
"""

from router.topology.cluster import SECOND_PRIMARY, ClusterTopology, NodeState, Role
from router.topology.lsn import format_lsn, parse_lsn
from router.topology.monitor import TopologyMonitor

__all__ = [
    "SECOND_PRIMARY",
    "ClusterTopology",
    "NodeState",
    "Role",
    "TopologyMonitor",
    "format_lsn",
    "parse_lsn",
]
