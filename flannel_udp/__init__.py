"""flannel-udp: a userspace overlay network for container hosts, compatible with flannel."""

__version__ = "0.1.0"
