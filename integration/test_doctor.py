"""nftlb doctor on a real kernel, inside the lab's gateway namespace.

Doctor reads /proc/sys/net and the sockets of the network namespace it runs in, so it
runs as a subprocess inside the gateway (`ip netns exec`), as an operator would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from integration import lab as labmod

VIP = "198.51.100.10"

DOCTOR = textwrap.dedent("""
    import json, sys
    from nftlb import doctor, kernel, pools_file, views
    text = sys.stdin.read()
    checks = doctor.run(pools_file.parse(text) if text.strip() else None, kernel.make(None))
    print(json.dumps({"checks": [c.as_dict() for c in checks], "exit": doctor.exit_code(checks),
                      "text": views.doctor(checks)}))
""")

# What a round-robin pool VIP:80 -> b1, b2 does to a new connection, in a table of the test's own.
DNAT = f"""table inet doctor_test {{
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr {VIP} tcp dport 80 dnat ip to numgen inc mod 2 map {{ 0 : 10.0.0.11 . 8080, 1 : 10.0.0.12 . 8080 }}
	}}
}}
"""

# Binds TCP VIP:80, UDP VIP:53 and TCP 0.0.0.0:8443, says "ready", then waits for stdin to close.
LISTENER = textwrap.dedent("""
    import socket, sys
    vip = sys.argv[1]
    socks = []
    for kind, addr, port in ((socket.SOCK_STREAM, vip, 80), (socket.SOCK_DGRAM, vip, 53),
                             (socket.SOCK_STREAM, "0.0.0.0", 8443)):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen()
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()
""")


def doctor(lab, pools: str = "") -> dict:
    cp = lab.exec(lab.gw, sys.executable, "-c", DOCTOR, input=pools, check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    out = json.loads(cp.stdout)
    print(out["text"])
    out["by_name"] = {c["name"]: c for c in out["checks"]}
    return out


def pool(name: str, port: int, protocol: str = "tcp", backends: str = "[10.0.0.11:8080]") -> str:
    return f"  - {{name: {name}, vip: '{VIP}', port: {port}, protocol: {protocol}, backends: {backends}}}\n"


def sysctl(lab, ns: str, setting: str) -> None:
    lab.exec(ns, labmod.SYSCTL, "-q", "-w", setting)  # inside the lab's namespace only


def test_ip_forward_off_fails_and_on_passes(lab_factory):
    lab = lab_factory(backends=1)
    pools = "pools:\n" + pool("web", 80)  # VIP not local to the gateway, backend on another host
    sysctl(lab, lab.gw, "net.ipv4.ip_forward=0")
    out = doctor(lab, pools)
    check = out["by_name"]["ip_forward"]
    assert check["verdict"] == "fail", check
    assert "10.0.0.11" in check["detail"] and "sysctl -w net.ipv4.ip_forward=1" in check["detail"]
    assert out["exit"] == 1
    assert out["by_name"]["kernel"]["verdict"] == "ok", out["by_name"]["kernel"]  # the dry-run passed
    assert out["by_name"][f"vip {VIP}"]["verdict"] == "ok"  # no route to it on the gateway: fine for DNAT
    assert "no route to it" in out["by_name"][f"vip {VIP}"]["detail"]
    refusal = out["by_name"][f"refusal {VIP}"]["detail"]
    assert "before routing: TCP reset;" in refusal and "'network unreachable'" in refusal, refusal
    assert len(out["text"].splitlines()) == len(out["checks"]) + 1

    sysctl(lab, lab.gw, "net.ipv4.ip_forward=1")
    out = doctor(lab, pools)
    assert out["by_name"]["ip_forward"]["verdict"] == "ok", out["by_name"]["ip_forward"]
    assert out["exit"] == 0, out["text"]
    # the probe was only checked by the kernel, never committed
    tables = lab.exec(lab.gw, "nft", "list", "tables").stdout
    assert "nftlb_doctor" not in tables


def test_ip_forward_verdict_matches_real_traffic_for_a_local_vip(lab):
    """A local VIP does not spare forwarding: packets DNATed to a remote backend are forwarded.

    The DNAT is a plain rule loaded with nft, so that this test judges doctor's verdict
    against the kernel's behaviour, not against nftlb's renderer."""
    lab.add_local_vip(VIP)
    pools = "pools:\n" + pool("web", 80, backends="[10.0.0.11:8080, 10.0.0.12:8080]")
    lab.exec(lab.gw, "nft", "-f", "-", input=DNAT)  # the gateway's own namespace: what the pool would do

    sysctl(lab, lab.gw, "net.ipv4.ip_forward=0")
    out = doctor(lab, pools)
    assert out["by_name"]["ip_forward"]["verdict"] == "fail" and out["exit"] == 1
    assert out["by_name"][f"vip {VIP}"]["detail"].startswith("local (on dev vip0)")
    assert lab.http_spread(VIP, 80, 3, timeout=1.0)["failed"] == 3  # and indeed nothing gets through

    sysctl(lab, lab.gw, "net.ipv4.ip_forward=1")
    assert doctor(lab, pools)["by_name"]["ip_forward"]["verdict"] == "ok"
    res = lab.http_spread(VIP, 80, 3, timeout=2.0)
    assert res["failed"] == 0, res


def test_local_listener_on_the_vip_is_named(lab_factory):
    lab = lab_factory(backends=1)
    lab.add_local_vip(VIP)
    proc = lab.popen(lab.gw, labmod.PYTHON, "-c", LISTENER, VIP, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        assert labmod._LineReader(proc.stdout).readline(labmod.READY_TIMEOUT).strip() == "ready"
        pools = "pools:\n" + pool("web", 80) + pool("dns", 53, "udp", "[10.0.0.11:5353]") + pool("tls", 443) \
            + pool("alt", 8443)
        out = doctor(lab, pools)
        name = labmod.PYTHON.rsplit("/", 1)[-1]
        for key, where in ((f"listener {VIP}:80/tcp", f"{VIP}:80"), (f"listener {VIP}:53/udp", f"{VIP}:53"),
                           (f"listener {VIP}:8443/tcp", "0.0.0.0:8443")):
            check = out["by_name"][key]
            assert check["verdict"] == "warn", check
            assert f"DNAT shadows it: {name} (pid {proc.pid}) listens on {where}" in check["detail"], check
            assert "will reach the backends instead" in check["detail"]
        assert f"listener {VIP}:443/tcp" not in out["by_name"]  # nothing listens there
        assert out["by_name"][f"vip {VIP}"]["verdict"] == "ok"
        refusal = out["by_name"][f"refusal {VIP}"]["detail"]  # this box's sysctls, as they are
        assert "TCP reset and ICMP port-unreachable (rate-limited per client: a burst of 6, then one per 1000 ms" \
            in refusal and "own connections: refused alike" in refusal, refusal
        assert out["exit"] == 0  # shadowing is a warning, not a blocker
    finally:
        proc.stdin.close()
        proc.wait(timeout=labmod.KILL_GRACE)


def test_without_a_file(lab_factory):
    lab = lab_factory(backends=1)
    out = doctor(lab)
    assert [c["name"] for c in out["checks"]] == [
        "kernel", "nft", "bindings", "ip_forward", "ipv6_forwarding", "rp_filter", "conntrack"]
    assert out["exit"] == 0, out["text"]
