"""subnet.env: flannel's format, written atomically, read back for the old subnet."""

import os
import stat
from ipaddress import IPv4Network, IPv6Network

import pytest

from flannel_udp import subnetenv
from flannel_udp.errors import UserError


def test_content_is_flannels_format():
    text = subnetenv.render(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), 1472, False)
    assert text == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\n"
                    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")


def test_dual_stack_content_is_flanneds_format():
    # REFERENCE.md section 5: flanneld v0.22.3 in dual stack
    text = subnetenv.render(IPv4Network("10.99.0.0/16"), IPv4Network("10.99.15.0/24"), 1450,
                            False, IPv6Network("fd99::/56"), IPv6Network("fd99:0:0:5c::/64"))
    assert text == ("FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.15.1/24\n"
                    "FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:5c::1/64\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")


def test_ipv6_only_content_has_no_ipv4_lines_as_flanneld_writes_it(tmp_path):
    # flannel's WriteSubnetFile writes FLANNEL_NETWORK/FLANNEL_SUBNET only with EnableIPv4
    text = subnetenv.render(None, None, 1450, True, IPv6Network("fd99::/56"),
                            IPv6Network("fd99:0:0:5c::/64"))
    assert text == ("FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:5c::1/64\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    path = tmp_path / "subnet.env"
    subnetenv.write(path, text)
    assert subnetenv.previous_subnet(path) is None
    assert subnetenv.previous_ipv6_subnet(path) == IPv6Network("fd99:0:0:5c::/64")


def test_previous_ipv6_subnet_is_read_back(tmp_path):
    path = tmp_path / "subnet.env"
    assert subnetenv.previous_ipv6_subnet(path) is None
    subnetenv.write(path, subnetenv.render(
        IPv4Network("10.99.0.0/16"), IPv4Network("10.99.15.0/24"), 1450, False,
        IPv6Network("fd99::/56"), IPv6Network("fd99:0:0:5c::/64")))
    assert subnetenv.previous_ipv6_subnet(path) == IPv6Network("fd99:0:0:5c::/64")
    assert subnetenv.previous_subnet(path) == IPv4Network("10.99.15.0/24")
    path.write_text("FLANNEL_IPV6_SUBNET=10.99.15.1/24\n")  # not IPv6
    assert subnetenv.previous_ipv6_subnet(path) is None


def test_write_replaces_atomically_with_mode_0644(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    subnetenv.write(path, "A=1\n")
    inode = os.stat(path).st_ino
    subnetenv.write(path, "A=2\n")
    assert path.read_text() == "A=2\n"
    assert os.stat(path).st_ino != inode  # a new file renamed over, never rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left


def test_previous_subnet_is_read_back(tmp_path):
    path = tmp_path / "subnet.env"
    assert subnetenv.previous_subnet(path) is None
    subnetenv.write(path, subnetenv.render(IPv4Network("10.5.0.0/16"),
                                           IPv4Network("10.5.52.0/24"), 1472, True))
    assert subnetenv.read(path)["FLANNEL_IPMASQ"] == "true"
    assert subnetenv.previous_subnet(path) == IPv4Network("10.5.52.0/24")
    path.write_text("FLANNEL_SUBNET=bogus\n")
    assert subnetenv.previous_subnet(path) is None


def test_a_subnet_file_is_locked_by_one_holder_and_the_lock_goes_with_it(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    first, second = subnetenv.SubnetFileLock(path), subnetenv.SubnetFileLock(path)
    first.acquire()
    assert subnetenv.lock_path(path).read_text() == f"{os.getpid()}\n"
    subnetenv.write(path, "A=1\n")  # the file is replaced; the lock file is not
    with pytest.raises(UserError, match=rf"subnet file {path} is in use by another running "
                                        rf"flannel-udp \(pid {os.getpid()}\): every daemon"):
        second.acquire()
    first.release()
    first.release()
    assert not subnetenv.lock_path(path).exists()
    second.acquire()
    second.release()
    assert sorted(p.name for p in path.parent.iterdir()) == ["subnet.env"]
