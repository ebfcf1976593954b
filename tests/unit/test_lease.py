"""Lease keys and values as flannel writes them, and the choice of a subnet."""

import random
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel_udp.config import parse_config
from flannel_udp.lease import (
    Lease,
    LeaseValueError,
    VxlanLeaseData,
    choose_new_subnet,
    decode_lease,
    encode_lease_value,
    format_mac,
    free_candidates,
    lease_from_record,
    lease_key,
    own_lease,
    parse_lease_key,
    parse_mac,
    parse_subnet_key,
    subnet_key,
)

NET = IPv4Network("10.5.52.0/24")
CFG = parse_config('{"Network": "10.5.0.0/16"}')


def test_udp_lease_value_is_flannels_bytes():
    assert encode_lease_value(IPv4Address("192.168.64.3")) == \
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null}'


def test_vxlan_lease_value_keeps_flannels_field_order():
    value = encode_lease_value(IPv4Address("192.168.64.3"), "vxlan",
                               b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}')
    assert value == (b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                     b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


# flannel v0.11's values on etcd's v2 keyspace, as REFERENCE.md section 5 saw them written
V011_UDP = b'{"PublicIP":"192.168.77.1"}'
V011_HOST_GW = b'{"PublicIP":"192.168.77.1","BackendType":"host-gw"}'
V011_VXLAN = (b'{"PublicIP":"192.168.77.1","BackendType":"vxlan",'
              b'"BackendData":{"VtepMAC":"5a:28:a0:26:72:83"}}')


def test_v011_lease_values_are_written_byte_for_byte():
    ip = IPv4Address("192.168.77.1")
    assert encode_lease_value(ip, v011=True) == V011_UDP
    assert encode_lease_value(ip, "host-gw", v011=True) == V011_HOST_GW
    # the backend hands its current BackendData (with VNI); v0.11's has none
    ours = VxlanLeaseData(1, bytes.fromhex("5a28a0267283")).encode()
    assert encode_lease_value(ip, "vxlan", ours, v011=True) == V011_VXLAN
    # and the same calls without v011 still write flannel >= v0.18's values
    assert encode_lease_value(ip, "host-gw") == (
        b'{"PublicIP":"192.168.77.1","PublicIPv6":null,"BackendType":"host-gw"}')


def test_v011_lease_values_decode():
    udp, host_gw, vxlan = (decode_lease(NET, v) for v in (V011_UDP, V011_HOST_GW, V011_VXLAN))
    assert (udp.backend, host_gw.backend, vxlan.backend) == ("udp", "host-gw", "vxlan")
    assert {udp.public_ip, host_gw.public_ip, vxlan.public_ip} == {IPv4Address("192.168.77.1")}
    assert host_gw.backend_data is None
    # no VNI: the config's (all v0.11 nodes share it; VNI 1 unless the config says otherwise)
    assert VxlanLeaseData.decode(vxlan.backend_data) == VxlanLeaseData(
        None, bytes.fromhex("5a28a0267283"))
    assert VxlanLeaseData(None, bytes.fromhex("5a28a0267283")).encode() == \
        b'{"VtepMAC":"5a:28:a0:26:72:83"}'


def test_key_round_trip():
    assert subnet_key(NET) == "10.5.52.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.5.52.0-24") == NET
    assert parse_subnet_key("config") is None
    assert parse_subnet_key("10.5.52.0-99") is None


# flanneld v0.22.3 in dual stack, as REFERENCE.md section 5 saw it write its lease
DUAL_KEY = "/coreos.com/network/subnets/10.99.15.0-24&fd99:0:0:25::-64"
DUAL_VALUE = (b'{"PublicIP":"192.168.77.2","PublicIPv6":"fd77::2","BackendType":"vxlan",'
              b'"BackendData":{"VNI":1,"VtepMAC":"4a:ed:9d:55:a8:86"},'
              b'"BackendV6Data":{"VNI":1,"VtepMAC":"66:3c:4e:3e:2d:52"}}')


def test_dual_stack_key_round_trip_is_flanneds():
    v4, v6 = IPv4Network("10.99.15.0/24"), IPv6Network("fd99:0:0:25::/64")
    assert parse_lease_key(DUAL_KEY) == (v4, v6)
    assert subnet_key(v4, v6) == DUAL_KEY.rsplit("/", 1)[1]
    assert parse_subnet_key(DUAL_KEY) == v4  # the v4 part, for the v4 plane
    assert parse_lease_key("10.99.15.0-24") == (v4, None)
    for bad in ("10.99.15.0-24&", "10.99.15.0-24&fd99:0:0:25::", "10.99.15.0-24&fd99::1-64",
                "10.99.15.0-24&10.1.0.0-16", "10.99.15.0-24&fd99::-129", "fd99::-64"):
        assert parse_lease_key(bad) is None, bad


def test_dual_stack_value_is_flanneds_byte_for_byte():
    value = encode_lease_value(
        IPv4Address("192.168.77.2"), "vxlan",
        VxlanLeaseData(1, bytes.fromhex("4aed9d55a886")).encode(),
        public_ipv6=IPv6Address("fd77::2"),
        backend_v6_data=VxlanLeaseData(1, bytes.fromhex("663c4e3e2d52")).encode())
    assert value == DUAL_VALUE
    # host-gw: BackendType only, as flannel's host-gw writes it
    assert encode_lease_value(IPv4Address("192.168.77.2"), "host-gw",
                              public_ipv6=IPv6Address("fd77::2")) == (
        b'{"PublicIP":"192.168.77.2","PublicIPv6":"fd77::2","BackendType":"host-gw"}')


def test_dual_stack_value_decodes_and_encodes_back_unchanged():
    lease = lease_from_record(DUAL_KEY, DUAL_VALUE, 123.0)
    assert lease.subnet == IPv4Network("10.99.15.0/24")
    assert lease.ipv6_subnet == IPv6Network("fd99:0:0:25::/64")
    assert lease.public_ipv6 == IPv6Address("fd77::2")
    assert VxlanLeaseData.decode(lease.backend_v6_data).vtep_mac == bytes.fromhex("663c4e3e2d52")
    assert lease_key(lease) == DUAL_KEY.rsplit("/", 1)[1]
    assert encode_lease_value(lease.public_ip, lease.backend_type, lease.backend_data,
                              public_ipv6=lease.public_ipv6,
                              backend_v6_data=lease.backend_v6_data) == DUAL_VALUE
    # a v4-only lease in a dual-stack network: no v6 part
    v4 = lease_from_record("10.99.16.0-24", b'{"PublicIP":"192.168.77.3","PublicIPv6":null}')
    assert (v4.ipv6_subnet, v4.public_ipv6, v4.backend_v6_data) == (None, None, None)
    with pytest.raises(LeaseValueError, match="PublicIPv6"):
        decode_lease(NET, b'{"PublicIP":"192.168.77.2","PublicIPv6":"192.168.77.2"}')
    with pytest.raises(ValueError):  # flannel v0.11 has no IPv6
        encode_lease_value(IPv4Address("192.168.77.2"), public_ipv6=IPv6Address("fd77::2"),
                           v011=True)


def test_flannel_written_leases_decode():
    lease = decode_lease(NET, b'{"PublicIP":"192.168.64.3","PublicIPv6":null,'
                              b'"BackendType":"vxlan","BackendData":{"VNI":1,'
                              b'"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    assert lease.public_ip == IPv4Address("192.168.64.3")
    assert lease.backend == "vxlan"
    assert lease.backend_data == b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}'
    assert decode_lease(NET, b'{"PublicIP":"10.0.0.1"}').backend == "udp"


@pytest.mark.parametrize("value", [b"garbage", b"[]", b'{"PublicIP": 7}', b"{}",
                                   b'{"PublicIP":"1.2.3.4","BackendType":5}', b"\xff"])
def test_values_that_are_not_leases_are_refused(value):
    with pytest.raises(LeaseValueError):
        decode_lease(NET, value)


def _lease(subnet: str, ip: str = "192.168.0.9") -> Lease:
    return Lease(IPv4Network(subnet), IPv4Address(ip))


def test_own_lease_is_found_by_public_ip_when_it_fits_the_config():
    leases = [_lease("10.5.3.0/24", "192.168.0.1"), _lease("10.5.4.0/24", "192.168.0.2")]
    assert own_lease(CFG, leases, IPv4Address("192.168.0.2")).subnet == IPv4Network("10.5.4.0/24")
    assert own_lease(CFG, leases, IPv4Address("192.168.0.3")) is None
    # a lease of ours that no longer fits (another SubnetLen) is not reused
    assert own_lease(CFG, [_lease("10.5.4.0/25", "192.168.0.2")],
                     IPv4Address("192.168.0.2")) is None


def test_preferred_subnet_is_taken_when_free_and_skipped_when_not():
    preferred = IPv4Network("10.5.77.0/24")
    assert choose_new_subnet(CFG, [], preferred) == preferred
    taken = [_lease("10.5.77.0/24")]
    assert choose_new_subnet(CFG, taken, preferred, random.Random(1)) != preferred
    outside = IPv4Network("10.9.77.0/24")
    assert choose_new_subnet(CFG, [], outside, random.Random(1)) != outside


def test_candidates_start_at_subnet_min_skip_taken_and_stop_at_100():
    taken = [_lease("10.5.1.0/24"), _lease("10.5.3.0/24")]
    found = free_candidates(CFG, taken)
    assert len(found) == 100
    assert found[:3] == [IPv4Network("10.5.2.0/24"), IPv4Network("10.5.4.0/24"),
                         IPv4Network("10.5.5.0/24")]
    chosen = {choose_new_subnet(CFG, taken, None, random.Random(seed)) for seed in range(50)}
    assert chosen <= set(found) and len(chosen) > 10


def test_a_full_network_has_no_subnet_to_offer():
    small = parse_config('{"Network": "10.5.0.0/28", "SubnetLen": 30}')
    leases = [_lease(f"10.5.0.{i}/30") for i in (4, 8, 12)]
    assert choose_new_subnet(small, leases, None) is None


# --- vxlan BackendData ---------------------------------------------------------------------


def test_vxlan_backend_data_is_flannels_bytes_and_decodes_back():
    data = VxlanLeaseData(1, bytes.fromhex("c6d2326f8f44"))
    assert data.encode() == b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}'
    assert VxlanLeaseData.decode(data.encode()) == data


def test_vxlan_backend_data_of_a_flannel_lease_decodes_with_go_json_leniency():
    lease = decode_lease(NET, b'{"PublicIP":"192.168.64.3","PublicIPv6":null,'
                              b'"BackendType":"vxlan","BackendData":{"vni":7,'
                              b'"vtepmac":"C6-D2-32-6F-8F-44","Extra":true}}')
    assert VxlanLeaseData.decode(lease.backend_data) == VxlanLeaseData(
        7, bytes.fromhex("c6d2326f8f44"))


@pytest.mark.parametrize("data, message", [
    (None, "not a JSON object"),
    (b"[]", "not a JSON object"),
    (b"{nope", "not JSON"),
    (b'{"VNI":1}', "VtepMAC null"),
    (b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f"}', 'VtepMAC "c6:d2:32:6f:8f"'),
    (b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:4g"}', "is not a MAC address"),
    (b'{"VNI":1,"VtepMAC":"c6:d2-32:6f:8f:44"}', "is not a MAC address"),
    (b'{"VNI":1,"VtepMAC":"c6d2.326f.8f44"}', "is not a MAC address"),
    (b'{"VNI":1,"VtepMAC":12}', "VtepMAC 12"),
    (b'{"VNI":"1","VtepMAC":"c6:d2:32:6f:8f:44"}', 'VNI "1"'),
])
def test_malformed_vxlan_backend_data_is_refused_saying_what_is_wrong(data, message):
    with pytest.raises(LeaseValueError, match=re.escape(message)):
        VxlanLeaseData.decode(data)


def test_mac_text_round_trip():
    assert format_mac(parse_mac("0E:FA:C0:A8:4D:0B")) == "0e:fa:c0:a8:4d:0b"
