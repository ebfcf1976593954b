"""`flannel-udp docker-opts`: what flannel's dist/mk-docker-opts.sh writes for dockerd from a
subnet.env, with its options and its output, byte for byte:

    DOCKER_OPT_BIP="--bip=10.244.3.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=false"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_OPTS=" --bip=10.244.3.1/24 --ip-masq=false --mtu=1472 "

With FLANNEL_IPV6_SUBNET (dual stack) DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=<FLANNEL_IPV6_SUBNET>"
comes between DOCKER_OPT_IPMASQ and DOCKER_OPT_MTU (alphabetical, as every option).

As in the script: DOCKER_OPT_IPMASQ appears only when FLANNEL_IPMASQ=true (flannel masquerades,
so docker must not; otherwise docker's own default, true, stands), the individual variables
come in alphabetical order, and the combined value starts with the current value of the
combined key's environment variable and a space, each option followed by a space. Two
differences, both deliberate: a missing subnet file, or one with no FLANNEL_SUBNET or
FLANNEL_MTU line, is an error (the script writes empty options), and `-m` works (the script
documents it but leaves it out of its getopts string).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from flannel_udp import subnetenv
from flannel_udp.errors import UserError

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_OUTPUT = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"


@dataclass
class DockerOptsOptions:
    subnet_file: str = DEFAULT_SUBNET_FILE  # -f
    output: str = DEFAULT_OUTPUT  # -d
    key: str = DEFAULT_KEY  # -k
    individual: bool = False  # -i
    combined: bool = False  # -c
    ipmasq: bool = True  # -m turns it off: no --ip-masq option at all


def docker_options(env: Mapping[str, str], ipmasq: bool = True) -> dict[str, str]:
    """DOCKER_OPT_<NAME> -> value from subnet.env's variables, in the script's order."""
    opts = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    if env.get("FLANNEL_IPMASQ") == "true" and ipmasq:
        opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    if env.get("FLANNEL_IPV6_SUBNET"):  # dual stack: docker0 gets the v6 subnet too
        opts["DOCKER_OPT_IPV6"] = f"--ipv6 --fixed-cidr-v6={env['FLANNEL_IPV6_SUBNET']}"
    return dict(sorted(opts.items()))  # the script lists them with `compgen -v`: sorted


def render(env: Mapping[str, str], opts: DockerOptsOptions,
           environ: Mapping[str, str] = os.environ) -> str:
    """The docker options file for subnet.env variables `env`."""
    values = docker_options(env, opts.ipmasq)
    individual, combined = opts.individual, opts.combined
    if not individual and not combined:  # neither flag: both kinds
        individual = combined = True
    lines = [f'{name}="{value}"' for name, value in values.items()] if individual else []
    if combined:
        joined = environ.get(opts.key, "") + " " + "".join(f"{v} " for v in values.values())
        lines.append(f'{opts.key}="{joined}"')
    return "".join(f"{line}\n" for line in lines)


def write_docker_opts(opts: DockerOptsOptions) -> str:
    """Read the subnet file, write the options file; returns what was written."""
    if not opts.key.isidentifier():
        raise UserError(f"-k {opts.key}: not a shell variable name")
    try:
        with open(opts.subnet_file):
            pass
    except OSError as e:
        raise UserError(f"-f {opts.subnet_file}: {e.strerror} (has `flannel-udp run` written "
                        "it yet?)", exit_code=1) from None
    env = subnetenv.read(opts.subnet_file)
    if not (env.get("FLANNEL_SUBNET") or env.get("FLANNEL_MTU")):
        raise UserError(f"-f {opts.subnet_file}: no FLANNEL_SUBNET or FLANNEL_MTU line, so no "
                        "option to write (is it the subnet file `flannel-udp run` writes?)",
                        exit_code=1)
    text = render(env, opts)
    try:
        subnetenv.write(opts.output, text)
    except OSError as e:
        raise UserError(f"-d {opts.output}: {e.strerror}", exit_code=1) from None
    return text
