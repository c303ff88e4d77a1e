"""The CLI end to end against the in-memory kernel: exit codes, messages, --json, state."""

import json

import pytest
from conftest import ROOT

from nftlb import cli, state

WEB = ROOT / "rules" / "web.yaml"


@pytest.fixture
def run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NFTLB_STATE_DIR", str(tmp_path / "state"))

    def _run(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return _run


def test_version_and_help(run):
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("nftlb ")
    code, out, _ = run("apply", "--help")
    assert code == 0 and "Example" in out


def test_usage_errors_exit_2(run):
    assert run("apply")[0] == 2
    assert run("frobnicate")[0] == 2
    assert run("apply", WEB, "--backend", "iptables")[0] == 2


def test_validate(run, write):
    code, out, _ = run("validate", WEB)
    assert code == 0 and "ok (2 pools, 6 backends" in out
    bad = write("pools:\n  - {name: a, vip: nope, port: 80, backends: [10.0.0.1]}\n")
    code, out, err = run("validate", bad)
    assert code == 2 and out == ""
    assert err == f"{bad}:2: pools[0].vip: 'nope' is not an IPv4 or IPv6 address\n"
    code, out, _ = run("validate", "--json", bad)
    doc = json.loads(out)
    assert code == 2 and doc["ok"] is False and doc["problems"][0]["line"] == 2


def test_render_is_the_golden_file(run):
    code, out, _ = run("render", WEB)
    assert code == 0 and out == (ROOT / "tests" / "golden" / "web.nft").read_text()


def test_diff_apply_in_sync_cycle(run, kernel, tmp_path):
    code, out, _ = run("diff", WEB)
    assert code == 1 and out.startswith("--- live: no table inet nftlb")

    code, out, _ = run("apply", "--dry-run", WEB)
    assert code == 0 and "dry run" in out and kernel.tables == {}
    assert kernel.scripts[-1][1] is True  # the kernel was asked to check, not to commit

    code, out, _ = run("apply", WEB)
    assert code == 0 and out.startswith("applied table inet nftlb: 2 pools")
    assert "pools added web, web-tls" in out
    assert list(kernel.tables) == ["nftlb"]
    commits = [s for s, check in kernel.scripts if not check]
    assert len(commits) == 1  # one transaction

    code, out, _ = run("apply", WEB)
    assert code == 0 and "in sync" in out and len([s for s, c in kernel.scripts if not c]) == 1
    code, out, _ = run("diff", WEB)
    assert code == 0 and "in sync" in out

    code, out, _ = run("diff", "--json", ROOT / "rules" / "weighted.yaml")
    doc = json.loads(out)
    assert code == 1 and doc["in_sync"] is False and 'comment "app"' in doc["changes"]


def test_drift_is_reported_and_repaired(run, kernel):
    assert run("apply", WEB)[0] == 0
    kernel.tables["nftlb"]["chain sneaky"] = {"decl": [], "rules": []}
    kernel.commits += 1  # as every change to nftables does
    code, out, _ = run("diff", WEB)
    assert code == 1 and "drift" in out and "chain sneaky: added outside nftlb" in out
    assert run("apply", WEB)[0] == 0
    assert run("diff", WEB)[0] == 0


def test_kernel_rejection_exits_3_and_keeps_everything(run, kernel, tmp_path):
    assert run("apply", WEB)[0] == 0
    before_tables, before_state = dict(kernel.tables), (tmp_path / "state" / state.APPLIED).read_bytes()
    kernel.reject = "Error: Could not process rule: Too many open files"
    code, out, err = run("apply", ROOT / "rules" / "weighted.yaml")
    assert code == 3 and "Too many open files" in err
    assert kernel.tables == before_tables
    assert (tmp_path / "state" / state.APPLIED).read_bytes() == before_state


def test_bad_file_never_reaches_the_kernel(run, kernel, write):
    bad = write("pools: [oops\n")
    for cmd in (["apply"], ["apply", "--dry-run"], ["diff"], ["render"]):
        code, _, err = run(*cmd, bad)
        assert code == 2 and f"{bad}:2: yaml:" in err
    assert kernel.scripts == []


def test_apply_json_summary(run, kernel):
    code, out, _ = run("apply", "--json", ROOT / "rules" / "ipv6.yaml")
    doc = json.loads(out)
    assert code == 0 and doc["action"] == "applied"
    assert doc["summary"] | {"refusing": []} == {
        "table": "nftlb", "pools": 3, "tcp": 3, "udp": 0, "ipv4": 1, "ipv6": 2,
        "backends": 6, "draining": 0, "down": 0, "refusing": []}


def test_renamed_table_retires_the_old_one_in_the_same_transaction(run, kernel, write):
    assert run("apply", WEB)[0] == 0
    moved = write(WEB.read_text().replace("table: nftlb", "table: lb2"))
    assert run("apply", moved)[0] == 0
    assert list(kernel.tables) == ["lb2"]


def test_remove_deletes_only_our_table(run, kernel):
    kernel.tables["foreign"] = {"chain keep": {"decl": [], "rules": []}}
    assert run("apply", WEB)[0] == 0
    code, out, _ = run("remove")
    assert code == 0 and out == "deleted table inet nftlb\n"
    assert list(kernel.tables) == ["foreign"]
    code, out, _ = run("remove")
    assert code == 0 and "nothing to do" in out
    assert run("remove", "--table", "x;flush ruleset")[0] == 2


def test_unexpected_errors_are_one_line_exit_3(run, monkeypatch, kernel):
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("nftlb.ops.apply", boom)
    code, out, err = run("apply", WEB)
    assert code == 3 and err == "nftlb: internal error: RuntimeError: kaboom (run with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "apply", str(WEB)])


def test_state_dir_unwritable_is_exit_3(run, kernel, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run("apply", "--state-dir", blocker / "sub", WEB)
    assert code == 3 and "state dir" in err and kernel.tables == {}


def test_systemd_units_print_and_install(run, tmp_path):
    code, out, _ = run("systemd", WEB, "--every", "5s")
    assert code == 0
    assert out.count("### nftlb-watch") == 3
    assert f"watch {WEB} --state-dir {tmp_path / 'state'}" in out  # absolute paths, our state dir
    assert "OnUnitActiveSec=5s" in out and "ExecReload=/bin/kill -HUP $MAINPID" in out
    code, out, _ = run("systemd", WEB, "--install", "--unit-dir", tmp_path / "units")
    assert code == 0 and out.count("wrote ") == 3
    unit = tmp_path / "units" / "nftlb-watch.service"
    assert oct(unit.stat().st_mode & 0o777) == "0o644" and "[Install]" in unit.read_text()
    assert run("systemd", WEB, "--every", "soon")[0] == 2


def test_drain_and_enable(run, kernel):
    assert run("drain", "web", "10.0.0.11")[0] == 3  # nothing applied yet
    assert run("apply", WEB)[0] == 0
    code, out, _ = run("drain", "web", "10.0.0.11")
    assert code == 0 and out == ("pool web backend 10.0.0.11:8080 drained; taking new connections: "
                                 "10.0.0.12:8080, 10.0.0.13:8080\n")
    code, out, _ = run("drain", "--json", "web", "10.0.0.12:8080")
    assert code == 0 and json.loads(out)["active"] == ["10.0.0.13:8080"]
    assert run("drain", "nope", "10.0.0.11")[0] == 2
    code, _, err = run("drain", "web", "10.9.9.9")
    assert code == 2 and "backends: 10.0.0.11:8080" in err
    code, out, _ = run("enable", "web", "10.0.0.11:8080")
    assert code == 0 and "10.0.0.11:8080, 10.0.0.13:8080" in out
    assert run("diff", WEB)[0] == 0  # drains are part of the desired state
