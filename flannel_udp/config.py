"""flannel's network config: parsing, defaults and validation, as flannel's CheckNetworkConfig.

Pure: no I/O. Every refusal is a `ConfigError` whose message names the offending field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel_udp.errors import UserError

# Backend types flannel knows; only those in IMPLEMENTED run here, the others are refused clearly.
KNOWN_BACKENDS = ("udp", "vxlan", "host-gw", "wireguard", "ipip", "alloc", "tencent-vpc",
                  "alivpc", "aws-vpc", "gce", "extension", "ipsec")
IMPLEMENTED_BACKENDS = ("udp", "vxlan", "host-gw")

# flannel's empty IP4Net and IP4: the Network (and each lease's IPv4 subnet) of an IPv6-only
# network (EnableIPv4 false), and the PublicIP its leases carry.
NO_IPV4 = IPv4Network("0.0.0.0/0")
NO_PUBLIC_IP = IPv4Address("0.0.0.0")

UDP_DEFAULT_PORT = 8285  # flannel's udp backend
MIN_IPV4_MTU = 68  # RFC 791: the smallest MTU an IPv4 link may have

_TOP_FIELDS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6",
               "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend",
               "EnableNFTables")


class ConfigError(UserError):
    """The network config is unusable; the message starts with the field name."""

    def __init__(self, message: str) -> None:
        super().__init__(f"invalid network config: {message}")


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    # backend options, keys as flannel spells them
    backend: dict[str, Any] = field(default_factory=dict)
    # EnableNFTables: flanneld's masquerade and forward rules in nftables, not iptables
    enable_nftables: bool = False
    # Dual stack (flannel's EnableIPv6): each lease holds an IPv6 subnet too. The ipv6_* fields
    # are set (defaults filled in) exactly when enable_ipv6 is.
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 64
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None

    def subnet_step(self) -> int:
        return 1 << (32 - self.subnet_len)

    def ipv6_subnet_step(self) -> int:
        return 1 << (128 - self.ipv6_subnet_len)

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """True when `subnet` is a lease this config could have handed out."""
        return (subnet.prefixlen == self.subnet_len and subnet.subnet_of(self.network)
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def contains_ipv6_subnet(self, subnet: IPv6Network) -> bool:
        """True when `subnet` is an IPv6 lease subnet this config could have handed out."""
        if (not self.enable_ipv6 or self.ipv6_network is None or self.ipv6_subnet_min is None
                or self.ipv6_subnet_max is None):
            return False
        return (subnet.prefixlen == self.ipv6_subnet_len and subnet.subnet_of(self.ipv6_network)
                and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max)


def _canonical_keys(obj: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """flannel matches JSON keys case-insensitively; map them onto the canonical spelling."""
    by_lower = {k.lower(): k for k in known}
    return {by_lower.get(k.lower(), k): v for k, v in obj.items()}


def int_field(cfg: dict[str, Any], name: str, label: str | None = None) -> int | None:
    """`cfg[name]` as an integer, None when absent; ConfigError naming `label` otherwise."""
    value = cfg.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label or name}: expected an integer, got {json.dumps(value)}")
    return value


def _addr_field(cfg: dict[str, Any], name: str) -> IPv4Address | None:
    value = cfg.get(name)
    if value is None:
        return None
    try:
        return IPv4Address(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}: {json.dumps(value)} is not an IPv4 address") from None


def _bool_field(cfg: dict[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {json.dumps(value)}")
    return value


def _addr6_field(cfg: dict[str, Any], name: str) -> IPv6Address | None:
    value = cfg.get(name)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise TypeError
        return IPv6Address(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}: {json.dumps(value)} is not an IPv6 address") from None


def _subnet_range(network: IPv4Network | IPv6Network, subnet_len: int, prefix: str,
                  given_min: Any, given_max: Any) -> tuple[Any, Any]:
    """[IPv6]SubnetMin and [IPv6]SubnetMax (`prefix` "" or "IPv6"), flannel's defaults (the
    second and the last subnet) for those not given, checked against the network."""
    step = 1 << (network.max_prefixlen - subnet_len)
    first = int(network.network_address)
    last = int(network.broadcast_address) + 1 - step
    address = type(network.network_address)
    subnet_min = given_min or address(first + step)
    subnet_max = given_max or address(last)
    for name, addr in ((f"{prefix}SubnetMin", subnet_min), (f"{prefix}SubnetMax", subnet_max)):
        if addr not in network:
            raise ConfigError(f"{name}: {addr} is outside {prefix}Network {network}")
        if int(addr) % step:
            raise ConfigError(f"{name}: {addr} is not aligned to {prefix}SubnetLen "
                              f"/{subnet_len}")
    if subnet_min > subnet_max:
        raise ConfigError(f"{prefix}SubnetMin: {subnet_min} is above {prefix}SubnetMax "
                          f"{subnet_max}")
    return subnet_min, subnet_max


def _ipv6_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """IPv6Network, IPv6SubnetLen, IPv6SubnetMin/Max with flannel's defaults and checks
    (CheckNetworkConfig), as NetworkConfig's ipv6_* fields."""
    if cfg.get("IPv6Network") is None:
        raise ConfigError('IPv6Network: missing with EnableIPv6 (e.g. "IPv6Network": '
                          '"fd00:10:244::/56")')
    try:
        if not isinstance(cfg["IPv6Network"], str):
            raise TypeError
        network = IPv6Network(cfg["IPv6Network"], strict=False)
    except (ValueError, TypeError):
        raise ConfigError(f"IPv6Network: {json.dumps(cfg['IPv6Network'])} is not an IPv6 "
                          "CIDR") from None
    subnet_len = int_field(cfg, "IPv6SubnetLen") or 0
    if subnet_len == 0:
        if network.prefixlen > 124:
            raise ConfigError(f"IPv6Network: {network} is too small; the longest usable "
                              "prefix is /124")
        subnet_len = 64 if network.prefixlen <= 62 else network.prefixlen + 2
    elif not network.prefixlen + 2 <= subnet_len <= 126:
        raise ConfigError(f"IPv6SubnetLen: {subnet_len} is out of range for IPv6Network "
                          f"{network} (must be {network.prefixlen + 2}..126)")
    subnet_min, subnet_max = _subnet_range(
        network, subnet_len, "IPv6", _addr6_field(cfg, "IPv6SubnetMin"),
        _addr6_field(cfg, "IPv6SubnetMax"))
    return {"ipv6_network": network, "ipv6_subnet_len": subnet_len,
            "ipv6_subnet_min": subnet_min, "ipv6_subnet_max": subnet_max}


def _network_field(cfg: dict[str, Any]) -> IPv4Network:
    try:
        if not isinstance(cfg["Network"], str):
            raise TypeError
        return IPv4Network(cfg["Network"], strict=False)
    except (ValueError, TypeError):
        raise ConfigError(f"Network: {json.dumps(cfg['Network'])} is not an IPv4 CIDR") from None


def _ipv4_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Network, SubnetLen, SubnetMin/Max with flannel's defaults and checks, as NetworkConfig's
    fields."""
    if "Network" not in cfg:
        raise ConfigError('Network: missing (e.g. "Network": "10.244.0.0/16")')
    network = _network_field(cfg)
    if network.prefixlen > 28:
        raise ConfigError(f"Network: {network} is too small; the longest usable prefix is /28")

    subnet_len = int_field(cfg, "SubnetLen") or 0
    if subnet_len == 0:
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    elif not network.prefixlen < subnet_len <= 30:
        raise ConfigError(f"SubnetLen: {subnet_len} is out of range for Network {network} "
                          f"(must be {network.prefixlen + 1}..30)")

    subnet_min, subnet_max = _subnet_range(network, subnet_len, "", _addr_field(cfg, "SubnetMin"),
                                           _addr_field(cfg, "SubnetMax"))
    return {"network": network, "subnet_len": subnet_len, "subnet_min": subnet_min,
            "subnet_max": subnet_max}


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate flannel network config JSON, filling in flannel's defaults."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError("expected a JSON object such as "
                          '{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')
    cfg = _canonical_keys(raw, _TOP_FIELDS)

    enable_ipv4 = _bool_field(cfg, "EnableIPv4", True)
    enable_ipv6 = _bool_field(cfg, "EnableIPv6", False)
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4: false with no EnableIPv6: the network would carry "
                          "nothing; set EnableIPv6 and IPv6Network for an IPv6-only network")
    if enable_ipv4:
        v4 = _ipv4_fields(cfg)
    else:
        # IPv6-only (flannel's CheckNetworkConfig skips the IPv4 keys): flannel's empty values.
        # A Network given anyway must still be a CIDR: flannel's JSON decoding refuses one
        # that is not.
        if cfg.get("Network") is not None:
            _network_field(cfg)
        v4 = {"network": NO_IPV4, "subnet_len": 0, "subnet_min": NO_PUBLIC_IP,
              "subnet_max": NO_PUBLIC_IP}

    ipv6: dict[str, Any] = {}
    if enable_ipv6:
        ipv6 = _ipv6_fields(cfg)

    backend = cfg.get("Backend")
    backend = {} if backend is None else backend
    if not isinstance(backend, dict):
        raise ConfigError(f"Backend: expected an object, got {json.dumps(backend)}")
    backend = _canonical_keys(backend, ("Type", "Port", "VNI", "MTU", "DirectRouting",
                                        "Dataplane"))
    backend_type = backend.get("Type", "udp")
    if not isinstance(backend_type, str):
        raise ConfigError(f"Backend.Type: expected a string, got {json.dumps(backend_type)}")
    backend_type = backend_type.lower()
    if backend_type not in KNOWN_BACKENDS:
        raise ConfigError(f"Backend.Type: unknown backend type {backend_type!r} "
                          f"(flannel-udp runs: {', '.join(IMPLEMENTED_BACKENDS)})")
    if backend_type not in IMPLEMENTED_BACKENDS:
        raise ConfigError(f"Backend.Type: {backend_type!r} is not implemented in flannel-udp yet "
                          f"(it runs: {', '.join(IMPLEMENTED_BACKENDS)})")

    nftables = cfg.get("EnableNFTables")
    nftables = False if nftables is None else nftables
    if not isinstance(nftables, bool):
        raise ConfigError(f"EnableNFTables: expected true or false, got {json.dumps(nftables)}")

    config = NetworkConfig(**v4, backend_type=backend_type, backend=backend,
                           enable_nftables=nftables, enable_ipv4=enable_ipv4,
                           enable_ipv6=enable_ipv6, **ipv6)
    # Bad options are refused here (so by `network set`), not at every daemon's start. host-gw
    # reads none, as flannel's. The vxlan backend's own module checks its options (imported
    # here, not at the top: it imports this module).
    if backend_type == "vxlan":
        from flannel_udp.backends.vxlan.options import vxlan_options
        vxlan_options(config)
    elif backend_type == "udp":
        backend_port(config, UDP_DEFAULT_PORT)
    return config


def backend_port(config: NetworkConfig, default: int) -> int:
    """`Backend.Port`, validated, or the backend's default."""
    port = int_field(config.backend, "Port", "Backend.Port")
    if port is None or port == 0:
        return default
    if not 1 <= port <= 65535:
        raise ConfigError(f"Backend.Port: {port} is out of range (1..65535)")
    return port
