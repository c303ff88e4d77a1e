import os
import re

import jinja2
import pytest
from conftest import ROOT

from nftlb import allowlist, errors, plan, pools_file, render, units

GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted((ROOT / "rules").glob("*.yaml"))


def rendered(text):
    return render.ruleset(plan.build(pools_file.parse(text)))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_match_golden_files(example):
    """Set NFTLB_UPDATE_GOLDEN=1 to rewrite tests/golden after an intended change; review the diff."""
    got = render.ruleset(plan.build(pools_file.load(example)))
    golden = GOLDEN / f"{example.stem}.nft"
    if os.environ.get("NFTLB_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


def test_replaces_only_its_own_table_in_one_script():
    text = rendered("table: lb7\npools: []\n")
    statements = [line for line in text.splitlines() if line and not line.startswith(("#", "\t", "}"))]
    assert statements == ["table inet lb7 {}", "delete table inet lb7", "table inet lb7 {"]
    assert "flush" not in text


def test_dispatch_and_objects_do_not_grow_with_the_pool_count():
    pools = "".join(f"  - {{name: p{i}, vip: 198.51.100.{i}, port: 80, backends: [10.0.0.1, 10.0.0.2]}}\n"
                    for i in range(1, 60))
    text = rendered("pools:\n" + pools)
    assert text.count("vmap @services4") == 2  # prerouting and output, not one rule per pool
    assert len(re.findall(r"198\.51\.100\.\d+ \. tcp \. 80 comment \"p\d+\" : goto hash4_tcp_53", text)) == 59
    assert text.count("\tchain ") == 16 and text.count("\tmap ") == 10  # the same for 1 pool or 10,000
    assert len(re.findall(r"198\.51\.100\.\d+ \. 80 \. \d+ : 10\.0\.0\.[12] \. 80", text)) == 59 * 53


def test_schedulers_seed_and_single_backend():
    text = rendered("""
seed: 0xabc
pools:
  - {name: h, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2], table_size: 7}
  - {name: s, vip: 198.51.100.2, port: 80, scheduler: source-hash, backends: [10.0.0.1, 10.0.0.2], table_size: 7}
  - {name: r, vip: 198.51.100.3, port: 53, protocol: udp, scheduler: round-robin, backends: [10.0.0.1, 10.0.0.2]}
  - {name: n, vip: 198.51.100.4, port: 80, scheduler: random, backends: [10.0.0.1, 10.0.0.2]}
  - {name: one, vip: "2001:db8::1", port: 80, backends: ["[fd00::1]:8080", {address: "fd00::2", state: drain}]}
  - {name: six, vip: "2001:db8::2", port: 80, backends: ["fd00::1", "fd00::2"], table_size: 7}
""")
    assert ("chain hash4_tcp_7 {\n\t\tmeta l4proto tcp dnat ip to ip daddr . tcp dport . jhash ip saddr . tcp sport "
            ". ip daddr . tcp dport mod 7 seed 0xabc map @slots4_tcp\n") in text
    assert "dnat ip to ip daddr . tcp dport . jhash ip saddr mod 7 seed 0xabc map @slots4_tcp" in text
    assert "chain rr_r {\n\t\tmeta l4proto udp dnat ip to ip daddr . udp dport . numgen inc mod 2 map @slots4_udp" in text
    assert "dnat ip to ip daddr . tcp dport . numgen random mod 2 map @slots4_tcp" in text
    assert 'elements = { 2001:db8::1 . 80 comment "one" : fd00::1 . 8080 }' in text  # direct6_tcp
    assert "dnat ip6 to ip6 daddr . tcp dport . jhash ip6 saddr . tcp sport mod 7 seed 0xabc map @slots6_tcp" in text
    assert ": goto refuse" not in text  # nothing refused
    assert "hook prerouting priority filter" not in text and "refuse_forward" not in text  # no per-packet rule


def test_all_drained_pool_is_refused_not_blackholed():
    text = rendered("""
pools:
  - {name: down, vip: 198.51.100.1, port: 80, backends: [{address: 10.0.0.1, state: drain}]}
""")
    # refused in the nat chains' one lookup, before routing: no route to the VIP is needed
    assert 'elements = { 198.51.100.1 . tcp . 80 comment "down" : goto refuse }' in text
    assert "\tchain refuse {\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n\t}" in text
    filters = re.findall(r"type filter hook (\w+) priority filter; policy accept;\n\t\t(.*)", text)
    assert filters == [(h, "ct status dnat jump count_traffic") for h in ("forward", "input", "output")]


def test_masquerade_and_persistence_elements():
    text = rendered("""
pools:
  - {name: m, vip: 198.51.100.1, port: 80, mode: masquerade, persistence: 90s, backends: [10.0.0.1:8080, 10.0.0.2:8080]}
""")
    assert 'set masquerade4_tcp {\n\t\ttypeof ip daddr . tcp dport\n\t\telements = { 198.51.100.1 . 80 comment "m" }' in text
    assert "map sticky4_tcp_90 {" in text and "timeout 90s" in text
    assert "update @sticky4_tcp_90 { ct original ip saddr . ct original ip daddr . ct original proto-dst : " \
           "ip daddr . tcp dport }" in text
    assert "chain hash4_tcp_53_p90 {\n\t\tdnat ip to ip saddr . ip daddr . tcp dport map @sticky4_tcp_90\n" in text


def test_identifiers_are_checked_again_at_render_time():
    bad = plan.Plan(table="x; flush ruleset", seed=1, pools=())
    with pytest.raises(ValueError, match="refusing to render"):
        render.ruleset(bad)


def test_undefined_template_variables_fail_loudly(tmp_path):
    (tmp_path / "t.j2").write_text("{{ nope }}")
    with pytest.raises(jinja2.UndefinedError):
        render.jinja(str(tmp_path)).get_template("t.j2").render()


def test_template_dir_found():
    assert (render.template_dir() / "ruleset.nft.j2").is_file()


def test_render_refusals_are_bad_input():
    """A refusal at render time is exit 2 like a validation problem, and still a ValueError."""
    assert issubclass(errors.RenderError, ValueError) and errors.RenderError.exit_code == 2
    with pytest.raises(errors.RenderError, match="nftables table name"):
        render.ruleset(plan.Plan(table="flush", seed=1, pools=()))  # a keyword: nft would not parse it
    with pytest.raises(errors.RenderError, match="as a number"):
        render.ruleset(plan.Plan(table="lb", seed="1; flush ruleset", pools=()))


def test_zone_index_cannot_reach_the_ruleset():
    import dataclasses
    import ipaddress

    p = plan.build(pools_file.parse('pools: [{name: a, vip: "2001:db8::1", port: 80, backends: ["fd00::1"]}]\n'))
    forged = dataclasses.replace(p, pools=(dataclasses.replace(p.pools[0], vip=ipaddress.IPv6Address("2001:db8::1%x}")),))
    with pytest.raises(errors.RenderError, match="refusing to render"):
        render.ruleset(forged)


@pytest.mark.parametrize("word, quoted, path", [
    ("/etc/nftlb/pools.yaml", "/etc/nftlb/pools.yaml", "/etc/nftlb/pools.yaml"),
    ("/etc/my pools.yaml", '"/etc/my pools.yaml"', '"/etc/my pools.yaml"'),
    ('/a"b', '"/a\\"b"', '"/a\\"b"'),
    ("/a\\b", '"/a\\\\b"', '"/a\\\\b"'),
    ("/100%", '"/100%%"', '"/100%%"'),
    ("/$HOME", '"/$$HOME"', "/$HOME"),  # no environment variables in path lists
    ("/a;b", '"/a;b"', '"/a;b"'),
])
def test_systemd_quote(word, quoted, path):
    assert units.systemd_quote(word) == quoted
    assert units.systemd_path(word) == path


@pytest.mark.parametrize("bad", ["/a\nExecStartPre=/bin/sh", "/a\rb", "/a\tb", "/a\x1bb", "/a\x00b", "/a\udcffb"])
def test_systemd_refuses_what_a_unit_line_cannot_carry(bad):
    for quote in (units.systemd_quote, units.systemd_path, units.systemd_text, units.systemd_comment):
        with pytest.raises(errors.RenderError, match="systemd unit"):
            quote(bad)


@pytest.mark.parametrize("shape", [True, False])
def test_elements_cannot_leave_their_set(shape):
    allowlist.check_elements("services4", ['198.51.100.1 . tcp . 80 comment "web" : goto hash4_tcp_53',
                                        "2001:db8::1 . 80 . 0 : fd00::1 . 8080"], shape=shape)
    for bad in ["198.51.100.1 . tcp . 80 } ; flush ruleset ; add element inet nftlb services4 { 198.51.100.2",
                "198.51.100.1 . tcp . 80\ndelete table inet nftlb",
                '198.51.100.1 . tcp . 80 comment "a" : goto x"',
                "198.51.100.1 . tcp . 80, 198.51.100.2 . tcp . 80",
                "198.51.100.1 . tcp . 80 # comment",
                "2001:db8::1%eth0 . 80"]:
        with pytest.raises(errors.RenderError, match="as an element of services4"):
            allowlist.check_elements("services4", [bad], shape=shape)
    with pytest.raises(errors.RenderError, match="as an element"):  # the shape, where it is checked
        allowlist.check_elements("services4", ["198.51.100.1 . tcp . 80 : drop"])
