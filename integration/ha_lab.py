"""A namespace lab for an HA pair: a client, a router, two gateways, three backends.

    client ns              router ns                        gw1 / gw2 ns                 lan ns        bI ns
    eth0 192.0.2.2/24 --- c0 192.0.2.1/24
                           brf 203.0.113.1/24 -+- vgw1f --- eth0 203.0.113.11|12/24
                                               +- vgw2f     (VIP 198.51.100.10/32: the master's)
                                                            eth1 10.0.0.2|3/24 ----- brb -+- vgw1b / vgw2b
                                                            (10.0.0.1/24: the master's)   +- vbI --- eth0 10.0.0.1I/24
                                                            eth2 10.93.0.11|12/24 (sync link, gw1 <-> gw2)

* The router sends the VIPs (198.51.100.0/24) on its link to the gateways: whichever
  gateway holds a VIP answers ARP for it (keepalived moves it and sends gratuitous ARP).
* Backends route everything via 10.0.0.1, the address that moves with the master.
* Gateways route the clients' network via the router; ip_forward=1 in each gateway.
* `cut(gw)` takes a gateway off both data links and the sync link, as a crash looks from
  outside (its daemons keep running, its links keep their carrier); `restore(gw)` puts it
  back, with whatever conntrack table it has (stale).

Every namespace and process is removed by teardown(), also when a test fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import threading

from integration import lab as labmod
from integration import netns

PREFIX = labmod.PROCESS_PREFIX  # swept by the session fixtures like every lab's
VIP = "198.51.100.10"
GATEWAYS = {"gw1": (11, 2), "gw2": (12, 3)}  # host numbers on the front and back links
SERVER = os.path.join(labmod.HERE, "server.py")
FLOWS = os.path.join(labmod.HERE, "flows.py")
_counter = itertools.count(1)
_lock = threading.Lock()


class HALab:
    def __init__(self, backends: int = 3):
        with _lock:
            self.prefix = f"{PREFIX}{next(_counter)}h"
        p = self.prefix
        self.client, self.router, self.lan = f"{p}-client", f"{p}-router", f"{p}-lan"
        self.gws = {name: f"{p}-{name}" for name in GATEWAYS}
        self.backends = {f"b{i}": (f"{p}-b{i}", f"10.0.0.{10 + i}") for i in range(1, backends + 1)}
        self.namespaces = [self.client, self.router, self.lan, *self.gws.values(), *(ns for ns, _ in self.backends.values())]
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []
        self.dir = tempfile.mkdtemp(prefix=f"{p}-")
        self._down = False
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        netns.add(self.namespaces, created=self.created)
        for ns in self.namespaces:
            netns.sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        netns.batch(self.router, [
            "link set lo up",
            f"link add c0 type veth peer name eth0 netns {self.client}",
            "link add brf type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            "link set c0 up", "link set brf up",
            "addr add 192.0.2.1/24 dev c0", "addr add 203.0.113.1/24 dev brf",
            "route add 198.51.100.0/24 dev brf",  # the VIPs: on the gateways' link, answered by the master
        ])
        netns.sysctl(self.router, "net.ipv4.ip_forward=1")
        netns.batch(self.lan, ["link set lo up", "link add brb type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
                               "link set brb up"])
        for name, ns in self.gws.items():
            front, back = GATEWAYS[name]
            netns.batch(self.router, [f"link add v{name}f type veth peer name eth0 netns {ns}",
                                      f"link set v{name}f master brf", f"link set v{name}f up"])
            netns.batch(self.lan, [f"link add v{name}b type veth peer name eth1 netns {ns}",
                                   f"link set v{name}b master brb", f"link set v{name}b up"])
        g1, g2 = self.gws["gw1"], self.gws["gw2"]
        netns.batch(g1, [f"link add eth2 type veth peer name eth2 netns {g2}"])
        for name, ns in self.gws.items():
            front, back = GATEWAYS[name]
            netns.batch(ns, ["link set lo up", "link set eth0 up", "link set eth1 up", "link set eth2 up",
                             f"addr add 203.0.113.{front}/24 dev eth0", f"addr add 10.0.0.{back}/24 dev eth1",
                             f"addr add 10.93.0.{front}/24 dev eth2", "route add default via 203.0.113.1"])
            netns.sysctl(ns, "net.ipv4.ip_forward=1")
        netns.batch(self.client, ["link set lo up", "link set eth0 up", "addr add 192.0.2.2/24 dev eth0",
                                  "route add default via 192.0.2.1"])
        for name, (ns, addr) in self.backends.items():
            netns.batch(self.lan, [f"link add v{name} type veth peer name eth0 netns {ns}",
                                   f"link set v{name} master brb", f"link set v{name} up"])
            netns.batch(ns, ["link set lo up", "link set eth0 up", f"addr add {addr}/24 dev eth0",
                             "route add default via 10.0.0.1"])
        netns.wait_links_ready(self.namespaces)

    # -- processes ------------------------------------------------------------

    def exec(self, ns: str, *argv, **kw) -> subprocess.CompletedProcess:
        return netns.nsexec(ns, *argv, **kw)

    def popen(self, ns: str, *argv, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([netns.IP, "netns", "exec", ns, *map(str, argv)], **kw)
        self.procs.append(proc)
        return proc

    def start_servers(self) -> None:
        for name, (ns, _) in self.backends.items():
            proc = self.popen(ns, labmod.PYTHON, SERVER, "--name", name, "--tcp", "8080", "--udp", "5353",
                              "--echo", "7070", "--push", "7071", stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
            line = labmod._LineReader(proc.stdout).readline(labmod.READY_TIMEOUT)
            if line.strip() != "ready":
                raise netns.NetnsError(f"server {name} did not start: {line!r}")

    # -- faults ---------------------------------------------------------------

    def cut(self, gw: str) -> None:
        """Off every link, as a crash looks from outside: frames to and from it go nowhere."""
        netns.batch(self.router, [f"link set v{gw}f nomaster"])
        netns.batch(self.lan, [f"link set v{gw}b nomaster"])
        netns.batch(self.gws[gw], ["link set eth2 down"])

    def restore(self, gw: str) -> None:
        netns.batch(self.router, [f"link set v{gw}f master brf"])
        netns.batch(self.lan, [f"link set v{gw}b master brb"])
        netns.batch(self.gws[gw], ["link set eth2 up"])

    # -- teardown -------------------------------------------------------------

    def teardown(self) -> None:
        if self._down:
            return
        self._down = True
        for proc in self.procs:
            try:
                netns.stop_process(proc)
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
        left = netns.delete(self.created)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            raise netns.NetnsError(f"could not delete namespaces {left}")

    def __enter__(self) -> HALab:
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()
