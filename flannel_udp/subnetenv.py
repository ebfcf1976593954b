"""subnet.env, the file flannel leaves for the container runtime: written atomically, in flannel's
format, and read back at start to ask for the same subnet again; and the lock that keeps a second
daemon from taking the file of a running one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from ipaddress import IPv4Network, IPv6Network, ip_interface
from pathlib import Path

from flannel_udp.errors import UserError


def render(network: IPv4Network | None, subnet: IPv4Network | None, mtu: int, ipmasq: bool,
           ipv6_network: IPv6Network | None = None,
           ipv6_subnet: IPv6Network | None = None) -> str:
    """flannel's WriteSubnetFile: each subnet as its first address with the lease's prefix
    length; the two IPv6 lines (dual stack) between the IPv4 ones and FLANNEL_MTU. IPv6-only
    (`network` None): no FLANNEL_NETWORK nor FLANNEL_SUBNET, as flanneld writes it."""
    text = ""
    if network is not None and subnet is not None:
        text = (f"FLANNEL_NETWORK={network}\n"
                f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}\n")
    if ipv6_network is not None and ipv6_subnet is not None:
        text += (f"FLANNEL_IPV6_NETWORK={ipv6_network}\n"
                 f"FLANNEL_IPV6_SUBNET={ipv6_subnet.network_address + 1}/"
                 f"{ipv6_subnet.prefixlen}\n")
    return text + (f"FLANNEL_MTU={mtu}\n"
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
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        reason = e.strerror if isinstance(e, OSError) else "not a text file"
        raise UserError(f"subnet file {path}: {reason}") from None
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name and not name.startswith("#"):
            values[name] = value
    return values


def _previous(path: str | os.PathLike, name: str, kind: type[IPv4Network] | type[IPv6Network]
              ) -> IPv4Network | IPv6Network | None:
    value = read(path).get(name)
    if not value:
        return None
    try:
        net = ip_interface(value).network
    except ValueError:
        return None
    return net if isinstance(net, kind) else None


def previous_subnet(path: str | os.PathLike) -> IPv4Network | None:
    """The subnet named by FLANNEL_SUBNET in an existing file, if it parses."""
    return _previous(path, "FLANNEL_SUBNET", IPv4Network)  # type: ignore[return-value]


def previous_ipv6_subnet(path: str | os.PathLike) -> IPv6Network | None:
    """The IPv6 subnet named by FLANNEL_IPV6_SUBNET in an existing file, if it parses."""
    return _previous(path, "FLANNEL_IPV6_SUBNET", IPv6Network)  # type: ignore[return-value]


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a subnet file: `.<name>.lock` beside it. Not the file itself: it is
    replaced by a rename at every write, which would leave a lock on the old inode."""
    target = Path(path)
    return target.with_name(f".{target.name}.lock")


class SubnetFileLock:
    """An flock held on the subnet file's lock file while a daemon runs, so that a second
    daemon given the same --subnet-file is refused before it leases or writes anything. The
    lock file holds the holder's pid (for the message) and goes when it is released."""

    def __init__(self, subnet_file: str | os.PathLike) -> None:
        self.subnet_file = subnet_file
        self.path = lock_path(subnet_file)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; UserError naming the holder when a running daemon has it."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise UserError(f"cannot lock subnet file {self.subnet_file} ({self.path}): "
                                f"{e.strerror}", exit_code=1) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(
                    f"subnet file {self.subnet_file} is in use by another running flannel-udp"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + ": every daemon on a machine needs its own --subnet-file and "
                    "--control-socket") from None
            # A holder that exited meanwhile removed the file it had locked: lock the one the
            # path names now, or two daemons could each hold a lock on a different file.
            try:
                here, now = os.fstat(fd), os.stat(self.path)
                current = (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it: see acquire) and let go. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
