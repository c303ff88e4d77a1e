"""`make demo`: a throwaway namespace lab, nftlb applying rules/web.yaml, real connections.

Builds client, gateway and three backend namespaces, runs nftlb inside the gateway,
prints which backend answered each new connection, then removes everything it made.
Needs root. Touches nothing outside the namespaces it creates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integration.lab import Lab  # noqa: E402

VIP = "198.51.100.10"


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it builds network namespaces", file=sys.stderr)
        return 2
    state_dir = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    with Lab(backends=3) as lab:
        lab.start_servers(tcp_ports=(8080, 8443))

        def nftlb(*args: str) -> None:
            print(f"\n[gateway]$ nftlb {' '.join(args)}")
            cp = lab.exec(lab.gw, sys.executable, "-m", "nftlb", *args, check=False,
                          env={"NFTLB_STATE_DIR": str(state_dir)})
            print((cp.stdout + cp.stderr).rstrip())
            if cp.returncode not in (0, 1):
                raise SystemExit(cp.returncode)

        print("lab: client 192.0.2.2 -> gateway 192.0.2.1 (nftlb) -> backends "
              + ", ".join(f"{b.name} {b.ipv4}" for b in lab.backends))
        nftlb("validate", "rules/web.yaml")
        nftlb("apply", "--dry-run", "rules/web.yaml")
        nftlb("apply", "rules/web.yaml")

        print(f"\n[client] 9 new TCP connections to {VIP}:80 (pool web, hash of the 4-tuple):")
        for i in range(1, 10):
            conn = lab.hold(VIP, 80)
            print(f"  connection {i}: client port {conn.local_port:5d} -> {conn.request()}")
            conn.close()

        conn = lab.hold(VIP, 80)
        answers = [conn.request() for _ in range(3)]
        conn.close()
        print(f"\n[client] one keep-alive connection, 3 HTTP requests -> {' '.join(answers)}"
              "  (L4 balances connections, not requests)")

        res = lab.http_spread(VIP, 443, 30)
        print(f"\n[client] 30 connections to {VIP}:443 (pool web-tls: persistence 5m, 10.0.0.13 draining) -> "
              + ", ".join(f"{k}: {v}" for k, v in sorted(res["backends"].items())))

        print("\n[gateway]$ nft list map inet nftlb services4")
        print(lab.exec(lab.gw, "nft", "list", "map", "inet", "nftlb", "services4").stdout.rstrip())
        nftlb("remove")
    subprocess.run(["rm", "-rf", str(state_dir)], check=False)
    print("\nlab namespaces deleted; nothing else on this machine was changed")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
