"""The lab: throwaway hosts, pods and etcd clusters as network namespaces, for the tests, the
demo and the bench; the daemon never imports it."""
