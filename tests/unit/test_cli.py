"""The command line: flanneld's flags, FLANNELD_ variables, aliases, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from flannel_udp import cli
from flannel_udp.cli import COMMANDS, build_parser


def flannel_udp(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "flannel_udp", *argv], capture_output=True,
                          text=True, env=env, timeout=60, cwd=cwd)


def test_defaults_are_flanneld_defaults(monkeypatch):
    for name in ("FLANNELD_SUBNET_FILE", "FLANNELD_ETCD_PREFIX", "FLANNELD_IFACE"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["run"])
    assert args.subnet_file == "/run/flannel/subnet.env"
    assert args.subnet_lease_renew_margin == 60
    assert args.etcd_prefix == "/coreos.com/network"
    assert args.healthz_ip == "0.0.0.0" and args.healthz_port == 0
    assert args.iface == [] and args.ip_masq is False


def test_environment_sets_flags_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("FLANNELD_IFACE", "eth7")
    monkeypatch.setenv("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30")
    monkeypatch.setenv("FLANNELD_IP_MASQ", "true")
    monkeypatch.setenv("FLANNELD_ETCD_ENDPOINTS", "http://127.0.0.1:2379")
    args = build_parser().parse_args(["run"])
    assert (args.iface, args.subnet_lease_renew_margin, args.ip_masq) == (["eth7"], 30, True)
    assert args.etcd_endpoints == "http://127.0.0.1:2379"
    args = build_parser().parse_args(["run", "--iface", "eth9",
                                      "--subnet-lease-renew-margin", "5"])
    assert (args.iface, args.subnet_lease_renew_margin) == (["eth9"], 5)


def test_deployment_article_spellings_are_aliases():
    args = build_parser().parse_args(["run", "--endpoints", "https://e:2379", "--ca-file", "ca",
                                      "--cert-file", "crt", "--key-file", "key"])
    assert (args.etcd_endpoints, args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile) == \
        ("https://e:2379", "ca", "crt", "key")


def test_network_set_and_get_round_trip(tmp_path):
    store = str(tmp_path / "leases")
    done = flannel_udp("network", "set", '{"Network":"10.9.0.0/16","SubnetLen":26}',
                       "--local-store", store)
    assert done.returncode == 0, done.stderr
    got = flannel_udp("network", "get", "--local-store", store)
    assert json.loads(got.stdout) == {"Network": "10.9.0.0/16", "SubnetLen": 26}
    cfg = tmp_path / "net.json"
    cfg.write_text('{"Network":"10.8.0.0/16"}')
    assert flannel_udp("network", "set", "--file", str(cfg), "--local-store", store).returncode == 0
    assert "10.8.0.0/16" in flannel_udp("network", "get", "--local-store", store).stdout


@pytest.mark.parametrize("argv, message, code", [
    (["network", "set", '{"Network":"10.9.0.0/16","SubnetLen":31}'], "SubnetLen", 2),
    (["network", "set", "{nope"], "not valid JSON", 2),
    (["network", "get"], "no network config", 1),
    (["run", "--etcd-endpoints", "gopher://127.0.0.1:2379"], "--etcd-endpoints", 2),
    (["run", "--public-ip", "banana"], "--public-ip", 2),
    (["run", "--subnet-lease-renew-margin", "0"], "--subnet-lease-renew-margin", 2),
    (["run", "--busy-poll", "-1"], "--busy-poll", 2),
    (["run", "--busy-poll", "1000001"], "--busy-poll", 2),
    (["status", "--control-socket", "/nonexistent/flannel-udp.sock"], "no flannel-udp daemon", 1),
])
def test_user_errors_are_one_line_and_a_nonzero_exit(tmp_path, argv, message, code):
    if argv[0] == "network":
        argv = [*argv, "--local-store", str(tmp_path / "leases")]
    done = flannel_udp(*argv)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_corrupt_store_is_named_and_kept(tmp_path):
    store = tmp_path / "leases"
    store.write_bytes(b"\x00garbage")
    done = flannel_udp("network", "get", "--local-store", str(store))
    assert done.returncode == 1
    assert str(store) in done.stderr and "corrupt" in done.stderr
    assert "Traceback" not in done.stderr
    assert store.read_bytes() == b"\x00garbage"


def test_network_set_refuses_a_bad_udp_port_and_writes_nothing(tmp_path):
    store = tmp_path / "leases"
    for port in ("70000", '"x"'):
        done = flannel_udp("network", "set",
                           f'{{"Network":"10.9.0.0/16","Backend":{{"Type":"udp","Port":{port}}}}}',
                           "--local-store", str(store))
        assert done.returncode == 2, done.stderr
        assert "Backend.Port" in done.stderr and done.stderr.count("\n") == 1
    assert not store.exists()


@pytest.mark.parametrize("argv", [["network", "set", "-"], ["network", "set", "--file", "-"]])
def test_network_set_reads_the_config_from_stdin_with_a_dash(tmp_path, argv):
    store = str(tmp_path / "leases")
    done = subprocess.run([sys.executable, "-m", "flannel_udp", *argv, "--local-store", store],
                          input='{"Network":"10.9.0.0/16"}', capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    got = flannel_udp("network", "get", "--local-store", store)
    assert json.loads(got.stdout) == {"Network": "10.9.0.0/16"}


def test_network_set_with_no_config_says_what_to_give_and_with_two_not_both(tmp_path):
    store = str(tmp_path / "leases")
    done = flannel_udp("network", "set", "--local-store", store)
    assert done.returncode == 2
    assert "not both" not in done.stderr
    assert "JSON" in done.stderr and "'-'" in done.stderr and "--file" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    cfg = tmp_path / "net.json"
    cfg.write_text('{"Network":"10.8.0.0/16"}')
    done = flannel_udp("network", "set", '{"Network":"10.9.0.0/16"}', "--file", str(cfg),
                       "--local-store", store)
    assert done.returncode == 2
    assert "not both" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "leases").exists()


def test_network_get_on_an_empty_store_says_how_to_set_one(tmp_path):
    done = flannel_udp("network", "get", "--local-store", str(tmp_path / "leases"))
    assert done.returncode == 1
    assert "no network config" in done.stderr and "flannel-udp network set" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "leases").exists()


def test_status_json_prints_its_error_as_json_and_exits_non_zero(tmp_path):
    done = flannel_udp("status", "--json", "--control-socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert "no flannel-udp daemon" in error and str(tmp_path / "none.sock") in error
    assert "Traceback" not in done.stderr


def test_the_module_docstring_names_every_subcommand():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(COMMANDS)
    described = cli.__doc__.replace("\n", " ")
    assert [c for c in commands if c not in described] == []


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`flannel-udp network get | true`: the reader is gone before the first write; no
    BrokenPipeError traceback, a non-zero exit."""
    store = tmp_path / "store"
    assert flannel_udp("network", "set", "--local-store", str(store),
                   '{"Network": "10.244.0.0/16"}').returncode == 0
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m flannel_udp network get "
                           f"--local-store {store} | true; echo $PIPESTATUS"],
                          capture_output=True, text=True)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.strip() == "1"


def test_a_subnet_file_that_is_a_directory_is_one_line(tmp_path):
    from flannel_udp import subnetenv
    from flannel_udp.errors import UserError
    with pytest.raises(UserError, match=f"subnet file {tmp_path}: Is a directory"):
        subnetenv.previous_subnet(tmp_path)


# The seed deployment's command lines (REFERENCE.md section 5), as Go's flag package takes them.
SEED_UNIT = ["--ip-masq", "--etcd-endpoints=https://10.0.0.1:2379,https://10.0.0.2:2379",
             "-etcd-cafile=/opt/flannel/cert/ca.pem", "-etcd-certfile=/opt/flannel/cert/c.pem",
             "-etcd-keyfile=/opt/flannel/cert/c-key.pem", "-etcd-prefix=/coreos.com/network"]
SEED_SCRIPT = ["--public-ip=192.168.77.1", "--endpoints=https://a:2379,https://b:2379",
               "--ca-file=/ca.pem", "--cert-file=/c.pem", "--key-file=/k.pem", "--iface=ens33",
               "--subnet-file=./subnet.env", "--healthz-port=2401"]


def test_the_seed_units_go_style_flags_are_taken():
    parser = build_parser()
    args = parser.parse_args(cli.go_style(["run", *SEED_UNIT], parser))
    assert (args.ip_masq, args.etcd_prefix, args.etcd_cafile, args.etcd_keyfile) == (
        True, "/coreos.com/network", "/opt/flannel/cert/ca.pem", "/opt/flannel/cert/c-key.pem")
    assert args.etcd_endpoints == "https://10.0.0.1:2379,https://10.0.0.2:2379"
    args = parser.parse_args(cli.go_style(["run", *SEED_SCRIPT], parser))
    assert (args.public_ip, args.iface, args.healthz_port, args.subnet_file) == (
        "192.168.77.1", ["ens33"], 2401, "./subnet.env")


@pytest.mark.parametrize(("argv", "ip_masq", "v"), [
    (["-ip-masq"], True, 0), (["-ip-masq=true"], True, 0), (["--ip-masq=false"], False, 0),
    (["-v=2"], False, 2), (["-v", "3"], False, 3)])
def test_go_booleans_and_single_letter_values(argv, ip_masq, v):
    parser = build_parser()
    args = parser.parse_args(cli.go_style(["run", *argv], parser))
    assert (args.ip_masq, args.v) == (ip_masq, v)


def test_go_style_leaves_values_and_unknown_flags_alone():
    parser = build_parser()
    assert cli.go_style(["run", "--busy-poll", "-5", "-nosuch=1", "--", "-iface"], parser) == [
        "run", "--busy-poll", "-5", "-nosuch=1", "--", "-iface"]


def test_mk_docker_opts_sh_is_docker_opts_under_the_scripts_name(tmp_path):
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"
                          "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    out = tmp_path / "docker_opts.env"
    code = ("import sys; from flannel_udp.cli import mk_docker_opts_main; "
            "sys.argv = ['mk-docker-opts.sh', *sys.argv[1:]]; "
            "raise SystemExit(mk_docker_opts_main())")
    done = subprocess.run([sys.executable, "-c", code, "-k", "DOCKER_NETWORK_OPTIONS",
                           "-f", str(subnet_env), "-d", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert 'DOCKER_NETWORK_OPTIONS=" --bip=10.244.3.1/24 --mtu=1472 "' in out.read_text()


@pytest.mark.parametrize("argv", [["--version"], ["run", "-version"]])
def test_version(argv):
    done = flannel_udp(*argv)
    assert (done.returncode, done.stdout.strip()) == (0, f"flannel-udp {cli.__version__}")


@pytest.mark.parametrize("flag", ["-kube-subnet-mgr", "--kube-api-url=https://10.0.0.1:6443",
                                  "-kubeconfig-file=/etc/k.conf"])
def test_kubernetes_subnet_manager_flags_are_refused_in_one_line(tmp_path, flag):
    store = tmp_path / "store"
    done = flannel_udp("run", flag, "--local-store", str(store))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("flannel-udp:")]
    assert len(lines) == 1 and "no Kubernetes subnet manager" in lines[0], done.stderr
    assert not store.exists()


def test_glogs_flags_are_accepted():
    parser = build_parser()
    args = parser.parse_args(cli.go_style(["run", "-vmodule=*=2", "-log_backtrace_at=:0"],
                                          parser))
    assert (args.vmodule, args.log_backtrace_at) == ("*=2", ":0")


@pytest.mark.parametrize(("argv", "ip_masq"), [
    (["--ip-masq", "-ip-masq=false"], False), (["-ip-masq=false", "--ip-masq"], True),
    (["-ip-masq=0", "-ip-masq=T"], True), (["--ip-masq=TRUE", "--ip-masq=F"], False)])
def test_a_boolean_given_twice_takes_the_last_value_as_go_does(argv, ip_masq):
    parser = build_parser()
    assert parser.parse_args(cli.go_style(["run", *argv], parser)).ip_masq is ip_masq


def test_a_boolean_false_on_the_command_line_beats_the_environment(monkeypatch):
    monkeypatch.setenv("FLANNELD_IP_MASQ", "true")
    parser = build_parser()
    assert parser.parse_args(cli.go_style(["run"], parser)).ip_masq is True
    assert parser.parse_args(cli.go_style(["run", "-ip-masq=false"], parser)).ip_masq is False


def test_a_boolean_takes_no_separate_value_and_refuses_other_spellings():
    done = flannel_udp("run", "--ip-masq", "false")  # Go: `false` is no value of -ip-masq
    assert done.returncode == 2 and "unrecognized arguments: false" in done.stderr
    done = flannel_udp("run", "--ip-masq=yes")
    assert done.returncode == 2 and "invalid boolean value 'yes'" in done.stderr


def test_iface_and_iface_regex_repeat_in_order_and_the_command_line_replaces_the_environment(
        monkeypatch):
    monkeypatch.setenv("FLANNELD_IFACE", "eth7")
    monkeypatch.setenv("FLANNELD_IFACE_REGEX", "^en")
    monkeypatch.setenv("FLANNELD_IFACE_CAN_REACH", "10.0.0.1")
    parser = build_parser()
    args = parser.parse_args(cli.go_style(["run"], parser))
    assert (args.iface, args.iface_regex, args.iface_can_reach) == (["eth7"], ["^en"],
                                                                    "10.0.0.1")
    args = parser.parse_args(cli.go_style(
        ["run", "-iface=nosuch", "--iface", "10.0.0.2", "-iface-regex", "^wl",
         "--iface-regex=^eth", "-iface-can-reach=10.1.1.1"], parser))
    assert (args.iface, args.iface_regex, args.iface_can_reach) == (
        ["nosuch", "10.0.0.2"], ["^wl", "^eth"], "10.1.1.1")


def test_an_empty_flanneld_iface_is_ignored_as_flanneld_ignores_it(monkeypatch):
    monkeypatch.setenv("FLANNELD_IFACE", "")
    assert build_parser().parse_args(["run"]).iface == []


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--public-ipv6", "192.168.77.1"], {}, "--public-ipv6 192.168.77.1: not an IPv6 address"),
    ([], {"FLANNELD_PUBLIC_IPV6": "banana"}, "--public-ipv6 banana: not an IPv6 address"),
    (["--public-ipv6", "::1"], {}, "--public-ipv6 ::1: other hosts cannot reach it there"),
    (["-public-ipv6=fe80::1"], {}, "--public-ipv6 fe80::1: a link-local address"),
    (["--iface-regex", "(eth"], {}, "--iface-regex (eth: not a valid regular expression"),
    (["--iface-can-reach", "banana"], {}, "--iface-can-reach banana: not an IPv4 address"),
    (["-iface-can-reach=fd00::1"], {}, "not an IPv4 address (IPv6 is not supported yet)"),
])
def test_refused_interface_flags_are_one_line_and_change_nothing(tmp_path, argv, env, message):
    store = tmp_path / "store"
    subnet_file = tmp_path / "subnet.env"
    done = flannel_udp("run", *argv, "--local-store", str(store), "--subnet-file",
                       str(subnet_file), env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr
    assert not store.exists() and not subnet_file.exists()


