"""The topology: a YAML graph of nodes and sockets, loaded with positions and checked as a whole."""

from zpipe.topology.errors import Problem, TopologyError
from zpipe.topology.load import load_topology
from zpipe.topology.model import HostSpec, NodeSpec, RegistrySpec, SocketSpec, Topology

__all__ = [
    "HostSpec",
    "NodeSpec",
    "Problem",
    "RegistrySpec",
    "SocketSpec",
    "Topology",
    "TopologyError",
    "load_topology",
]
