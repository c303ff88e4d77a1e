"""The kernel seam's programs, through the one exec seam, with a fake that checks argv and stdin."""

import pytest

from nftlb import checks, doctor, update
from nftlb.errors import KernelError
from nftlb.kernel import programs
from nftlb.kernel.conntrack import Tool
from nftlb.kernel.fake import FakePrograms
from nftlb.kernel.nft import NftBinary

UNREPLIED = ("udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=20000 dport=53 [UNREPLIED] src=10.0.0.11 "
             "dst=192.0.2.2 sport=5353 dport=20000 mark=0 use=1\n"
             "udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=20001 dport=53 src=10.0.0.11 "
             "dst=192.0.2.2 sport=5353 dport=20001 mark=0 use=1\n")


@pytest.fixture
def fake_programs(monkeypatch):
    fake = FakePrograms()
    monkeypatch.setattr(programs, "RUNNER", fake)
    return fake


def test_nft_gets_the_script_on_stdin_never_a_shell_line(fake_programs):
    nft = NftBinary("/usr/sbin/nft")
    nft.run("table inet x {}\n")
    nft.run("table inet x {}\n", check=True)
    fake_programs.answers[("nft", "-j", "list")] = (0, '{"nftables": []}', "")
    assert nft.list("table inet x") == '{"nftables": []}'
    assert fake_programs.calls == [("nft", ["-f", "-"], "table inet x {}\n"), ("nft", ["-c", "-f", "-"], "table inet x {}\n"),
                               ("nft", ["-j", "list", "table", "inet", "x"], None)]
    fake_programs.answers[("nft", "-f", "-")] = (1, "", "Error: Could not process rule: Operation not permitted\n")
    with pytest.raises(KernelError, match="needs CAP_NET_ADMIN"):
        nft.run("table inet x {}\n")
    fake_programs.answers[("nft", "-j", "list")] = (1, "", "Error: No such file or directory\n")
    assert nft.list("table inet x") is None


def test_conntrack_deletes_what_the_flows_say(fake_programs):
    tool = Tool("/usr/sbin/conntrack")
    flows = update.Flows("web", "ip", "tcp", "198.51.100.10", 80, ("10.0.0.11", 8080), True)
    fake_programs.answers[("conntrack", "-D")] = (0, "", "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n")
    assert tool.delete(flows) == 3
    assert fake_programs.calls[-1][1] == ["-D", "-f", "ipv4", "-p", "tcp", "--orig-dst", "198.51.100.10", "--orig-port-dst",
                                      "80", "--reply-src", "10.0.0.11", "--reply-port-src", "8080", "--state", "SYN_SENT"]
    tool.delete(update.Flows("dns", "ip6", "udp", "2001:db8::53", 53, None, False))  # a reset: every entry
    assert fake_programs.calls[-1][1] == ["-D", "-f", "ipv6", "-p", "udp", "--orig-dst", "2001:db8::53", "--orig-port-dst", "53"]


def test_conntrack_picks_unreplied_udp_entries_one_by_one(fake_programs):
    tool = Tool("conntrack")
    fake_programs.answers[("conntrack", "-L")] = (0, UNREPLIED, "")
    fake_programs.answers[("conntrack", "-D")] = (0, "", "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been deleted.\n")
    flows = update.Flows("dns", "ip", "udp", "198.51.100.10", 53, ("10.0.0.11", 5353), True)
    assert tool.delete(flows) == 1  # the replied flow from port 20001 stays
    assert [c[1][0] for c in fake_programs.calls] == ["-L", "-D"]
    assert fake_programs.calls[-1][1][-4:] == ["-s", "192.0.2.2", "--sport", "20000"]


def test_conntrack_nothing_matched_and_failures(fake_programs):
    tool = Tool("conntrack")
    flows = update.Flows("web", "ip", "tcp", "198.51.100.10", 80, None, True)
    fake_programs.answers[("conntrack", "-D")] = (1, "", "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n")
    assert tool.delete(flows) == 0
    fake_programs.answers[("conntrack", "-D")] = (1, "", "conntrack v1.4.7 (conntrack-tools): Operation failed: invalid parameters\n")
    with pytest.raises(KernelError, match="invalid parameters"):
        tool.delete(flows)
    with pytest.raises(KernelError, match="not installed"):
        Tool("").delete(flows)
    assert Tool("").open_connections() is None


def test_doctor_asks_nft_and_ip_through_the_seam(fake_programs):
    fake_programs.answers[("nft", "--version")] = (0, "nftables v1.0.6 (Lester Gooch #5)\n", "")
    fake_programs.answers[("ip", "-j", "route", "get")] = (2, "", "RTNETLINK answers: Network is unreachable\n")
    assert doctor._nft_version() == "nftables v1.0.6 (Lester Gooch #5)"
    assert checks.route("198.51.100.1") == {}  # no route: ip says so with a non-zero exit


def test_a_missing_program_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(programs, "find", lambda tool: None)
    with pytest.raises(programs.Missing, match="the conntrack program was not found"):
        programs.run("conntrack", ["-L"])
