"""`python -m flannel_udp` is the `flannel-udp` command."""

from flannel_udp.cli import main

raise SystemExit(main())
