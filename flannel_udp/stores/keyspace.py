"""Which store the flags name, and with etcd which keyspace: v3 (flanneld v0.18 and later) or
v2 (flanneld v0.11, the seed's `ETCDCTL_API=2 etcdctl set`). `--etcd-api auto` asks both for the
network config and takes the one holding it: v3 first (and v3 when both hold one, with a
warning), v2 else; neither: v3. A member that does not serve v2 counts as no config there."""

from __future__ import annotations

import logging

from flannel_udp.errors import UserError
from flannel_udp.stores import Store

log = logging.getLogger("flannel-udp")

ETCD_APIS = ("auto", "v3", "v2")


class StoreChoice:
    """The stores the flags allow; `choose()` says which one holds (or is to hold) the config."""

    def __init__(self, candidates: list[Store], where: str) -> None:
        self.candidates = candidates  # in the order asked: v3 before v2
        self.where = where  # e.g. "etcd http://10.0.0.1:2379 (prefix /coreos.com/network)"
        self.chosen: Store | None = None

    async def choose(self) -> Store:
        """The store to use; with several candidates, the first holding a network config (a
        warning when a later one holds one too), else the first."""
        if len(self.candidates) == 1:
            self.chosen = self.candidates[0]
            return self.chosen
        from flannel_udp.stores.etcd2 import EtcdV2Disabled
        holding = []
        for store in self.candidates:
            try:
                if await store.get_config() is not None:
                    holding.append(store)
            except EtcdV2Disabled as e:
                log.debug("%s: no config there", e)
        if len(holding) > 1:
            log.warning("%s: both etcd keyspaces hold a network config; using %s's (give "
                        "--etcd-api %s to use the other's)", self.where, holding[0].keyspace,
                        holding[1].keyspace.split()[-1])
        self.chosen = holding[0] if holding else self.candidates[0]
        return self.chosen

    def describe(self, store: Store) -> str:
        """`store` in messages: where it is and which keyspace."""
        if store.keyspace == "embedded":
            return self.where
        return f"{self.where}, {store.keyspace} keyspace"

    def none_found(self) -> str:
        """Where no network config was found, for the message saying so."""
        if len(self.candidates) > 1:
            return f"{self.where}: neither the etcd v3 nor the v2 keyspace holds one"
        return self.describe(self.candidates[0])

    async def close(self) -> None:
        for store in self.candidates:
            await store.close()


def open_store(local_store: str, etcd_endpoints: str | None, etcd_api: str, prefix: str,
               cafile: str | None, certfile: str | None, keyfile: str | None,
               username: str | None, password: str | None) -> StoreChoice:
    """The stores flanneld's flags name: the embedded one without --etcd-endpoints, else etcd's
    keyspaces as --etcd-api allows. UserError (exit 2) for a bad flag."""
    if etcd_api not in ETCD_APIS:
        raise UserError(f"--etcd-api {etcd_api}: must be one of {', '.join(ETCD_APIS)}")
    if not etcd_endpoints:
        from flannel_udp.stores.local import LocalStore
        return StoreChoice([LocalStore(local_store)], f"lease store {local_store}")
    from flannel_udp.stores.etcdcommon import EtcdOptions
    options = EtcdOptions.from_flags(etcd_endpoints, prefix, cafile, certfile, keyfile,
                                     username, password)
    candidates: list[Store] = []
    if etcd_api in ("auto", "v3"):
        from flannel_udp.stores.etcd import EtcdStore
        candidates.append(EtcdStore(options))
    if etcd_api in ("auto", "v2"):
        from flannel_udp.stores.etcd2 import Etcd2Store
        candidates.append(Etcd2Store(options))
    name = f"etcd {','.join(e.url for e in options.endpoints)}"
    return StoreChoice(candidates, f"{name} (prefix {prefix})")
