import pytest
from conftest import ROOT

from nftlb import pools_file, schema, yamltree
from nftlb.errors import ConfigError

GOOD = """
table: lb
seed: 0x5eed
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends:
      - 10.0.0.11:8080
      - {address: 10.0.0.12, port: 8080, weight: 2}
      - {address: 10.0.0.13, state: drain}
      - 10.0.0.14
  - name: web6
    vip: 2001:db8::10
    port: 443
    protocol: udp
    scheduler: round-robin
    mode: masquerade
    backends: ["[2001:db8:1::11]:8443", "2001:db8:1::12"]
"""


def problems(write, text):
    path = write(text)
    with pytest.raises(ConfigError) as e:
        pools_file.load(path)
    return [(p.line, p.field, p.message) for p in e.value.problems], path


def test_examples_in_rules_are_valid():
    files = sorted((ROOT / "rules").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert pools_file.load(f).pools


def test_good_file_with_defaults_and_short_forms(write):
    c = pools_file.load(write(GOOD))
    assert c.table == "lb" and c.seed == 0x5EED
    web, web6 = c.pools
    assert (web.protocol, web.scheduler, web.mode) == ("tcp", "hash", "dnat")
    assert [(str(b.address), b.port, b.weight, b.state) for b in web.backends] == [
        ("10.0.0.11", 8080, 1, "active"),
        ("10.0.0.12", 8080, 2, "active"),
        ("10.0.0.13", 80, 1, "drain"),  # no port: the pool's port
        ("10.0.0.14", 80, 1, "active"),
    ]
    assert [(str(b.address), b.port) for b in web6.backends] == [("2001:db8:1::11", 8443), ("2001:db8:1::12", 443)]
    assert web6.family == "ip6" and web.family == "ip"


def test_defaults_table_and_seed(write):
    c = pools_file.load(write("pools: []\n"))
    assert c.table == "nftlb" and c.seed == schema.DEFAULT_SEED and c.pools == []


def test_seed_as_hex_string(write):
    assert pools_file.load(write('seed: "0xabc"\npools: []\n')).seed == 0xABC


def test_every_problem_is_listed_with_its_line(write):
    found, path = problems(write, """
        pools:
          - name: Web
            vip: 198.51.100.300
            port: 0
            protocl: udp
            backends: []
          - name: ok
            vip: 198.51.100.1
            port: 70000
            scheduler: fastest
            backends:
              - {address: 10.0.0.1, weight: 1001}
              - "10.0.0.2:x"
              - {address: 10.0.0.3, state: up}
        """)
    assert found == [
        (2, "pools[0].name", "'Web' is not a pool name: use 1-31 characters a-z 0-9 _ -, starting with a letter"),
        (3, "pools[0].vip", "'198.51.100.300' is not an IPv4 or IPv6 address"),
        (4, "pools[0].port", "Input should be greater than or equal to 1 (got 0)"),
        (5, "pools[0].protocl", "unknown key"),
        (6, "pools[0].backends", "List should have at least 1 item after validation, not 0"),
        (9, "pools[1].port", "Input should be less than or equal to 65535 (got 70000)"),
        (10, "pools[1].scheduler",
         "Input should be 'hash', 'source-hash', 'round-robin' or 'random' (got 'fastest')"),
        (12, "pools[1].backends[0].weight", "Input should be less than or equal to 1000 (got 1001)"),
        (13, "pools[1].backends[1]", "port in '10.0.0.2:x' is not a number"),
        (14, "pools[1].backends[2].state", "Input should be 'active' or 'drain' (got 'up')"),
    ]


def test_problem_renders_as_file_line_field_message(write):
    path = write("pools:\n  - {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1], extra: 1}\n")
    with pytest.raises(ConfigError) as e:
        pools_file.load(path)
    assert str(e.value) == f"{path}:2: pools[0].extra: unknown key"


def test_cross_field_problems(write):
    found, _ = problems(write, """
        pools:
          - name: web
            vip: 198.51.100.10
            port: 80
            backends: [10.0.0.1, "[2001:db8::1]:80", 10.0.0.1:80]
          - name: web
            vip: 198.51.100.10
            port: 80
            backends: [10.0.0.2]
          - name: udp
            vip: 198.51.100.10
            port: 80
            protocol: udp
            backends: [10.0.0.2]
        """)
    assert found == [
        (5, "pools[0].backends[1]", "IPv6 backend 2001:db8::1 in a pool whose vip 198.51.100.10 is IPv4"),
        (5, "pools[0].backends[2]", "backend 10.0.0.1:80 is listed twice (first on line 5)"),
        (6, "pools[1].name", "duplicate pool name 'web' (first on line 2)"),
        (7, "pools[1].vip", "198.51.100.10:80/tcp is already served by the pool on line 3"),
    ]


def test_cross_field_problems_are_listed_next_to_field_errors(write):
    found, _ = problems(write, """
        pools:
          - {name: web, vip: 198.51.100.300, port: 80, backends: [10.0.0.11:8080]}
          - name: api
            vip: 198.51.100.1
            port: 70000
            backends: [{address: 10.0.0.1, weight: 0}, "[2001:db8::1]:80"]
          - {name: web, vip: 198.51.100.2, port: 80, backends: [10.0.0.3]}
        """)
    assert [(f[0], f[1]) for f in found] == [
        (2, "pools[0].vip"), (5, "pools[1].port"), (6, "pools[1].backends[0].weight"),
        (6, "pools[1].backends[1]"), (7, "pools[2].name")]


@pytest.mark.parametrize("address, why", [
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("127.0.0.1", "loopback"),
    ("fe80::1", "link-local"), ("::ffff:10.0.0.1", "IPv4-mapped"), ("255.255.255.255", "broadcast"),
])
def test_unusable_addresses(write, address, why):
    found, _ = problems(write, f"""
        pools:
          - name: a
            vip: 198.51.100.1
            port: 80
            backends: [{{address: "{address}"}}]
        """)
    assert len(found) == 1 and found[0][:2] == (5, "pools[0].backends[0].address") and why in found[0][2]


@pytest.mark.parametrize("text, expected", [
    ("", (1, "(top)", "file is empty; expected a mapping with a 'pools' list")),
    ("- 1\n- 2\n", (1, "(top)", "file is a list; expected a mapping with a 'pools' list")),
    ("table: nftlb\n", (1, "pools", "required key is missing")),

    ("pools: []\npools: []\n", (2, "pools", "duplicate key (first given on line 1)")),
    ("table: 'x; flush ruleset'\npools: []\n", (1, "table",
     "'x; flush ruleset' is not a table name: use 1-31 characters a-z 0-9 _, starting with a letter")),
    ("seed: 0x1ffffffff\npools: []\n", (1, "seed", "Input should be less than or equal to 4294967295 (got 8589934591)")),
    ("pools: []\n? [a]\n: 1\n", (2, "(top)", "keys must be plain scalars")),
])
def test_file_level_problems(write, text, expected):
    found, _ = problems(write, text)
    assert found == [expected]


def test_yaml_booleans_in_names_get_a_hint(write):
    found, _ = problems(write, "pools:\n  - {name: off, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}\n")
    assert found == [(2, "pools[0].name", "YAML read this as the boolean false (yes/no/on/off); put it in quotes")]


def test_yaml_syntax_error_names_its_line(write):
    found, _ = problems(write, "pools: [\n  {name: a\n")
    [(line, field, message)] = found  # libyaml and pure-Python PyYAML word it differently
    assert (line, field) == (3, "yaml") and message.startswith("while parsing a flow mapping")


def test_strict_numbers(write):
    found, _ = problems(write, """
        pools:
          - {name: a, vip: 198.51.100.1, port: "80", backends: [{address: 10.0.0.1, weight: true}]}
        """)
    assert [f[1] for f in found] == ["pools[0].port", "pools[0].backends[0].weight"]


def test_unreadable_binary_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="No such file"):
        pools_file.load(tmp_path / "missing.yaml")
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"pools: []\n\xff\xfe\x00")
    with pytest.raises(ConfigError) as e:
        pools_file.load(junk)
    assert str(e.value) == f"{junk}:2: file: not UTF-8 text"
    monkeypatch.setattr(pools_file, "MAX_FILE_BYTES", 16)
    junk.write_text("pools: []\n# padding padding\n")
    with pytest.raises(ConfigError, match="larger than"):
        pools_file.load(junk)


def test_alias_bomb_is_refused(write, monkeypatch):
    monkeypatch.setattr(yamltree, "MAX_NODES", 1000)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcde"):
        prev = "abcde"[i]
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    found, _ = problems(write, bomb)
    assert found == [(0, "file", "more than 1000 YAML nodes")]


def test_merge_keys_are_understood(write):
    c = pools_file.load(write("""
        pools:
          - &base {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}
          - {<<: *base, name: b, port: 81}
        """))
    assert [(p.name, p.port, str(p.vip)) for p in c.pools] == [("a", 80, "198.51.100.1"), ("b", 81, "198.51.100.1")]


HEALTHY = """
health: {interval: 500ms, timeout: 0.2, rise: 1, fall: 2}
pools:
  - name: web
    vip: 198.51.100.1
    port: 80
    health: {port: 8081, interval: 1m, timeout: 2s}
    when_all_down: keep-last
    backends: [10.0.0.1, {address: 10.0.0.2, backup: true}]
  - {name: dns, vip: 198.51.100.1, port: 53, protocol: udp, health: off, backends: [10.0.0.1]}
  - {name: dflt, vip: 198.51.100.2, port: 53, protocol: udp, on_down: keep, backends: [10.0.0.1]}
"""


def test_health_settings_merge_pool_over_defaults(write):
    c = pools_file.load(write(HEALTHY))
    web, dns, dflt = c.pools
    assert c.probe_settings(web) == schema.ProbeSettings(interval=60.0, timeout=2.0, rise=1, fall=2, port=8081)
    assert c.probe_settings(dns) is None
    assert c.probe_settings(dflt) == schema.ProbeSettings(interval=0.5, timeout=0.2, rise=1, fall=2, port=None)
    assert web.when_all_down == "keep-last" and dns.when_all_down == "reject"
    assert [b.backup for b in web.backends] == [False, True]
    assert (web.reset_on_down, dns.reset_on_down, dflt.reset_on_down) == (False, True, False)


def test_health_defaults(write):
    c = pools_file.load(write("pools: [{name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}]\n"))
    assert c.probe_settings(c.pools[0]) == schema.ProbeSettings(interval=2.0, timeout=1.0, rise=2, fall=3, port=None)


def test_bad_health_settings(write):
    found, _ = problems(write, """
        health: {interval: 2 weeks, timeout: 3s, rise: 0}
        pools:
          - name: a
            vip: 198.51.100.1
            port: 80
            health: {interval: 100ms}
            on_down: explode
            when_all_down: panic
            backends: [{address: 10.0.0.1, backup: maybe}]
        """)
    assert [f[:2] for f in found] == [
        (1, "health.interval"), (1, "health.rise"), (7, "pools[0].on_down"),
        (8, "pools[0].when_all_down"), (9, "pools[0].backends[0].backup")]
    assert "'2 weeks' is not a duration" in found[0][2]
    found, _ = problems(write, """
        pools:
          - name: a
            vip: 198.51.100.1
            port: 80
            health: {interval: 100ms}
            backends: [10.0.0.1]
        """)
    assert found == [(5, "pools[0].health", "timeout (1s) must not exceed interval (0.1s)")]


def test_json_files_are_read_fast_and_their_problems_still_have_lines(write):
    import json

    doc = {"seed": 7, "pools": [{"name": "web", "vip": "198.51.100.1", "port": 80, "backends": ["10.0.0.1:8080"]}]}
    c = pools_file.load(write(json.dumps(doc), "pools.json"))
    assert c.seed == 7 and str(c.pools[0].backends[0].address) == "10.0.0.1"
    doc["pools"][0]["port"] = 0
    found, _ = problems(write, json.dumps(doc, indent=2))
    assert found == [(7, "pools[0].port", "Input should be greater than or equal to 1 (got 0)")]
    found, _ = problems(write, '{"pools": [], "pools": []}')
    assert found == [(1, "pools", "duplicate key (first given on line 1)")]


# -- hardening: limits and strictness (see also tests/test_fuzz.py) ----------------------


def test_size_limit_message_names_both_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(pools_file, "MAX_FILE_BYTES", 16)
    big = tmp_path / "big.yaml"
    big.write_text("pools: []\n# padding padding\n")
    with pytest.raises(ConfigError) as e:
        pools_file.load(big)
    assert str(e.value) == f"{big}: 28 bytes, larger than the limit of 16 bytes (0 MiB)"


@pytest.mark.parametrize("text", [
    "pools: " + "[" * 100_000 + "]" * 100_000,  # libyaml's composer recursed in C: a segfault
    "pools: " + "{a: " * 100_000 + "1" + "}" * 100_000,
    "- " * 100_000 + "x",
    "pools: &a [*a]\n",  # an alias inside itself
    "a: &a {<<: *a}\npools: []\n",  # a merge of itself
])
def test_nesting_is_bounded_before_anything_recurses(write, text):
    found, _ = problems(write, text)
    assert len(found) == 1 and found[0][1:] == ("yaml", f"lists and mappings nested more than {yamltree.MAX_DEPTH} deep")


def test_merge_key_bomb_is_refused_before_it_grows(write):
    bomb = "m0: &m0 {k0: 1, k1: 2}\n" + "".join(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n" for i in range(1, 60))
    found, _ = problems(write, bomb + "pools: []\n")
    assert found == [(0, "file", f"more than {yamltree.MAX_NODES} YAML nodes")]


def test_a_merged_mapping_used_twice_is_not_a_duplicate(write):
    """Building an aliased mapping with a merge key again used to report its merged keys as duplicates."""
    c = pools_file.load(write("""
        pools:
          - {name: a, vip: 198.51.100.1, port: 80, backends: [&bk {<<: {port: 8080, weight: 2}, address: 10.0.0.1, port: 8081}]}
          - {name: b, vip: 198.51.100.2, port: 80, backends: [*bk]}
        """))
    assert [(b.port, b.weight) for p in c.pools for b in p.backends] == [(8081, 2), (8081, 2)]


@pytest.mark.parametrize("vip, message", [
    ("2001:db8::1%eth0", "has a zone index"),
    ("2001:db8::1%x;flush ruleset", "has a zone index"),  # Python's ipaddress kept it, and str() gave it back
    ("198.51.100.1\u00a0", "is not an IPv4 or IPv6 address"),  # str.strip() would take U+00A0
    ("١٩٨.51.100.1", "is not an IPv4 or IPv6 address"),
])
def test_addresses_are_plain(write, vip, message):
    found, _ = problems(write, f'pools:\n  - {{name: a, vip: "{vip}", port: 80, backends: ["2001:db8::2"]}}\n')
    assert any(f[1] == "pools[0].vip" and message in f[2] for f in found), found


@pytest.mark.parametrize("backend", ["10.0.0.1:８０", "10.0.0.1:٨٠", "10.0.0.1:" + "9" * 5000])
def test_ports_in_short_forms_are_ascii_digits(write, backend):
    found, _ = problems(write, f'pools:\n  - {{name: a, vip: 198.51.100.1, port: 80, backends: ["{backend}"]}}\n')
    assert [f[:2] for f in found] == [(2, "pools[0].backends[0]")] and "is not a number" in found[0][2]


def test_durations_and_seeds_are_ascii(write):
    found, _ = problems(write, 'seed: "٥"\nhealth: {interval: "٥s"}\npools: []\n')
    assert [f[1] for f in found] == ["seed", "health.interval"]


@pytest.mark.parametrize("table", ["tcp", "flush", "table", "ip", "sets", "counter"])
def test_nft_keywords_are_not_table_names(write, table):
    found, _ = problems(write, f"table: {table}\npools: []\n")
    assert found == [(1, "table", f"'{table}' is an nftables keyword, which nft does not take as a table name "
                                  f"(choose another, e.g. lb_{table})")]


@pytest.mark.parametrize("text, message", [
    ("pools: !!python/object/apply:os.system ['true']\n", "unsupported YAML tag"),
    ("pools: !!set {a: null}\n", "unsupported YAML tag"),
    ("pools: !!bool maybe\n", "cannot read 'maybe' as a bool"),
    ("seed: " + "9" * 5000 + "\npools: []\n", "(too many digits)"),
    ("pools: []\nx: \"\x1b\"\n", "character '\\x1b' (U+001B) is not allowed in YAML"),
])
def test_odd_yaml_is_a_problem_with_a_line(write, text, message):
    found, _ = problems(write, text)
    assert found and found[0][0] >= 1 and any(message in f[2] for f in found), found


def test_huge_numbers_are_reported_without_their_digits(write):
    found, _ = problems(write, "pools:\n  - {name: a, vip: 198.51.100.1, port: 18446744073709551616, "
                               "backends: [{address: 10.0.0.1, weight: 1000000000000000000000000000000}]}\n")
    assert [f[2] for f in found] == ["Input should be less than or equal to 65535 (got a 65-bit number)",
                                     "Input should be less than or equal to 1000 (got a 100-bit number)"]


def test_whitespace_only_file_is_empty(write):
    assert problems(write, " \t\n\t \n")[0] == [(1, "(top)", "file is empty; expected a mapping with a 'pools' list")]


def test_odd_keys_cannot_fake_report_lines(write):
    found, _ = problems(write, '"a\\nb.yaml:1: pools: ok": 1\npools: []\n')
    assert found == [(1, "'a\\nb.yaml:1: pools: ok'", "unknown key")]


def test_path_probes_settings(write):
    c = pools_file.load(write("""
        health: {path: true}
        pools:
          - {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}
          - {name: m, vip: 198.51.100.2, port: 80, mode: masquerade, backends: [10.0.0.1]}
          - {name: p, vip: 198.51.100.3, port: 80, health: {path: false}, backends: [10.0.0.1]}
        """))
    a, m, p = (c.probe_settings(x) for x in c.pools)
    assert (a.path, m.path, p.path) == (True, False, False)  # masquerade backends answer the gateway itself
    assert c.health.path_source == schema.PATH_SOURCES and c.path_sources() == (schema.PATH_SOURCES[0],)
    c = pools_file.load(write("""
        health: {path_source: "2001:db8:ffff::1"}
        pools:
          - {name: a, vip: "2001:db8::1", port: 80, health: {path: true}, backends: ["fd00::1"]}
          - {name: b, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}
        """))
    assert [str(x) for x in c.path_sources()] == ["2001:db8:ffff::1"]
    assert pools_file.load(write("pools: [{name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}]\n")
                      ).path_sources() == ()  # nobody asks: no SNAT rule, nothing marked


def test_bad_path_probe_settings(write):
    found, _ = problems(write, """
        health:
          path_source: [203.0.113.1, 203.0.113.2]
        pools:
          - {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}
        """)
    assert found == [(2, "health.path_source", "give one address, or a list of at most one IPv4 and one IPv6 address")]
    found, _ = problems(write, """
        health:
          path: true
          path_source: 10.0.0.1
        pools:
          - name: a
            vip: "2001:db8::1"
            port: 80
            backends: ["fd00::1"]
          - name: m
            vip: 198.51.100.2
            port: 80
            mode: masquerade
            health: {path: true}
            backends: [10.0.0.1]
        """)
    assert found == [
        (3, "health.path_source", "pool a is probed by its clients' path and needs an IPv6 path_source"),
        (3, "health.path_source", "10.0.0.1 is a VIP or a backend here; a path source must be an address no "
                                  "client, VIP or backend has"),
        (13, "pools[1].health.path", "path probes are for mode: dnat (masquerade backends answer the gateway's "
                                     "own address, which the plain probe already uses)"),
    ]
