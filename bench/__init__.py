"""flannel-udp's benchmark harness (issue 5): `python -m bench` from the repository root builds
two hosts in network namespaces and measures the bare underlay, kernel VXLAN as flanneld programs
it, and flannel-udp's udp and vxlan backends on that one topology, in one run."""
