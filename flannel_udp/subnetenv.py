"""subnet.env, the file flannel leaves for the container runtime: written atomically, in flannel's
format, and read back at start to ask for the same subnet again."""

from __future__ import annotations

import os
import tempfile
from ipaddress import IPv4Network, ip_interface
from pathlib import Path


def render(network: IPv4Network, subnet: IPv4Network, mtu: int, ipmasq: bool) -> str:
    first_host = subnet.network_address + 1
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={first_host}/{subnet.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


def write(path: str | os.PathLike, content: str) -> None:
    """Replace the file atomically (temp file in the same folder, fsync, rename), mode 0644."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str | os.PathLike) -> dict[str, str]:
    """The variables of a subnet.env; empty when the file does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name and not name.startswith("#"):
            values[name] = value
    return values


def previous_subnet(path: str | os.PathLike) -> IPv4Network | None:
    """The subnet named by FLANNEL_SUBNET in an existing file, if it parses."""
    value = read(path).get("FLANNEL_SUBNET")
    if not value:
        return None
    try:
        net = ip_interface(value).network
    except ValueError:
        return None
    return net if isinstance(net, IPv4Network) else None
