"""status, metrics, history and rollback, logging: against the in-memory kernel."""

import json
import logging
import stat

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nftlb import cli, desired, logs, metrics, ops, state, status, views
from nftlb.errors import KernelError, UsageError


@pytest.fixture
def sd(tmp_path):
    return tmp_path / "state"


def pools(*backends, name="web", port=80) -> str:
    return (f"pools:\n  - name: {name}\n    vip: 198.51.100.10\n    port: {port}\n    backends:\n"
            + "".join(f"      - {b}\n" for b in backends))


def write(tmp_path, text, name="pools.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_history_keeps_each_new_file_and_rollback_walks_back(tmp_path, kernel, sd):
    files = [write(tmp_path, pools(*[f"10.0.0.{i}:80" for i in range(1, k + 1)]), f"p{k}.yaml") for k in (1, 2, 3)]
    plans = []
    for f in files:
        ops.apply(f, kernel, sd)
        plans.append(desired.applied_plan(state.load(sd)))
    ops.apply(files[2], kernel, sd)  # the same file again: no new generation
    assert [(e["id"], e["live"]) for e in ops.history(sd)] == [(3, True), (2, False), (1, False)]
    assert all("source_text" not in e and len(e["sha256"]) == 64 for e in ops.history(sd))
    assert ops.history(sd)[0]["summary"] == "1 pools, 3 backends; changed web"

    commits = kernel.commits
    target, r = ops.rollback(kernel, sd, dry_run=True)
    assert target["id"] == 2 and r.action == "dry-run" and kernel.commits == commits
    target, r = ops.rollback(kernel, sd)
    assert target["id"] == 2 and r.action == "applied" and desired.applied_plan(state.load(sd)) == plans[1]
    ops.rollback(kernel, sd)
    assert desired.applied_plan(state.load(sd)) == plans[0]
    with pytest.raises(UsageError, match="no generation before #1"):
        ops.rollback(kernel, sd)
    ops.apply(files[1], kernel, sd)
    assert [(e["id"], e["live"]) for e in ops.history(sd)] == [(4, True), (1, False)]


def test_history_keeps_the_last_ten(tmp_path, kernel, sd):
    for k in range(1, 14):
        ops.apply(write(tmp_path, pools("10.0.0.1:80", port=k)), kernel, sd)
    ids = [e["id"] for e in ops.history(sd)]
    assert ids == list(range(13, 3, -1))
    for path in (sd / state.HISTORY).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rollback_to_what_is_already_live_moves_only_the_record(tmp_path, kernel, sd):
    ops.apply(write(tmp_path, pools("10.0.0.1:80", "10.0.0.2:80")), kernel, sd)
    ops.apply(write(tmp_path, pools("10.0.0.1:80", "{address: 10.0.0.2, port: 80, state: drain}")), kernel, sd)
    ops.set_drain(kernel, sd, "web", "10.0.0.2:80", True)  # the operator's drain: generation 1 now plans the same
    commits = kernel.commits
    target, r = ops.rollback(kernel, sd)
    assert r.action == "in-sync" and kernel.commits == commits
    assert state.load(sd).history_id == target["id"] == 1


def test_applies_and_failures_are_counted_and_a_failure_changes_no_state(tmp_path, kernel, sd):
    f = write(tmp_path, pools("10.0.0.1:80"))
    ops.apply(f, kernel, sd)
    before = (sd / state.APPLIED).read_bytes()
    kernel.reject = "Error: Could not process rule: No space left on device"
    with pytest.raises(KernelError):
        ops.apply(write(tmp_path, pools("10.0.0.2:80")), kernel, sd)
    assert (sd / state.APPLIED).read_bytes() == before
    assert [e["id"] for e in ops.history(sd)] == [1]
    stats = state.read_doc(sd, state.STATS)
    assert stats["applies"] == 1 and stats["apply_failures"] == 1 and stats["last_apply_success"] > 0


def test_status_without_a_watcher_and_with_a_drain(tmp_path, kernel, sd):
    ops.apply(write(tmp_path, pools("10.0.0.1:80", "10.0.0.2:80", "{address: 10.0.0.3, port: 80, backup: true}")),
              kernel, sd)
    ops.set_drain(kernel, sd, "web", "10.0.0.2:80", True)
    doc = status.collect(kernel, sd, conntrack="/nonexistent/conntrack")
    rows = {b["backend"]: b for b in doc["pools"][0]["backends"]}
    assert rows["10.0.0.1:80"]["serving"] and rows["10.0.0.1:80"]["health"] is None
    assert rows["10.0.0.2:80"]["drained_by_operator"] and not rows["10.0.0.2:80"]["serving"]
    assert rows["10.0.0.3:80"]["configured"] == "backup" and not rows["10.0.0.3:80"]["serving"]
    assert doc["conntrack"] is False and rows["10.0.0.1:80"]["open"] is None
    text = views.status(doc)
    assert "pool web  198.51.100.10:80/tcp  hash  dnat  serving" in text
    assert "open connections unknown" in text and "health not watched" in text
    json.dumps(doc)  # --json: plain data


def test_open_connections_parses_conntrack(tmp_path):
    tool = tmp_path / "conntrack"
    tool.write_text("#!/bin/sh\n[ \"$3\" = ipv6 ] && exit 0\ncat <<'EOF'\n"
                    "tcp      6 431999 ESTABLISHED src=192.0.2.2 dst=198.51.100.10 sport=40000 dport=80 "
                    "src=10.0.0.11 dst=192.0.2.2 sport=8080 dport=40000 [ASSURED] mark=0 use=1\n"
                    "tcp      6 119 TIME_WAIT src=192.0.2.2 dst=198.51.100.10 sport=40001 dport=80 "
                    "src=10.0.0.11 dst=192.0.2.2 sport=8080 dport=40001 [ASSURED] mark=0 use=1\n"
                    "udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=5000 dport=53 "
                    "src=10.0.0.12 dst=192.0.2.2 sport=5353 dport=5000 mark=0 use=1\n"
                    "EOF\n")
    tool.chmod(0o755)
    assert status.open_connections(str(tool)) == {
        ("198.51.100.10", "tcp", 80, "10.0.0.11", 8080): 1,
        ("198.51.100.10", "udp", 53, "10.0.0.12", 5353): 1,
    }


def test_metrics_families_from_the_fake_kernel(tmp_path, kernel, sd):
    ops.apply(write(tmp_path, pools("10.0.0.1:80", "10.0.0.2:80")), kernel, sd)
    text = generate_latest(metrics.registry(lambda: kernel, sd)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"nftlb_backend_up", "nftlb_backend_serving", "nftlb_backend_connections", "nftlb_backend_bytes",
            "nftlb_backend_transitions", "nftlb_applies", "nftlb_apply_failures",
            "nftlb_last_apply_success_timestamp_seconds", "nftlb_table_loaded", "nftlb_status_ok"} <= names
    assert 'nftlb_backend_up{backend="10.0.0.1:80",pool="web"} 1.0' in text
    assert "nftlb_applies_total 1.0" in text


def test_metrics_say_when_the_state_cannot_be_read(sd, kernel):
    text = generate_latest(metrics.registry(lambda: kernel, sd)).decode()
    assert "nftlb_status_ok 0.0" in text


@pytest.mark.parametrize("given,want", [("9650", ("127.0.0.1", 9650)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
                                        ("[::1]:9650", ("::1", 9650)), (":9650", ("127.0.0.1", 9650))])
def test_metrics_listen_address(given, want):
    assert metrics.listen_address(given) == want


@pytest.mark.parametrize("bad", ["", "host:", "1.2.3.4:99999", "abc"])
def test_metrics_listen_address_rejects(bad):
    with pytest.raises(UsageError):
        metrics.listen_address(bad)


def test_json_log_lines():
    record = logging.LogRecord("nftlb", logging.WARNING, __file__, 1, "pool %s down", ("web",), None)
    doc = json.loads(logs._Json().format(record))
    assert doc["level"] == "warning" and doc["message"] == "pool web down" and doc["pid"] > 0


def test_cli_history_rollback_status(tmp_path, kernel, sd, monkeypatch, capsys):
    monkeypatch.setenv("NFTLB_STATE_DIR", str(sd))
    a, b = write(tmp_path, pools("10.0.0.1:80"), "a.yaml"), write(tmp_path, pools("10.0.0.2:80"), "b.yaml")
    assert cli.main(["apply", str(a)]) == 0 and cli.main(["apply", str(b)]) == 0
    capsys.readouterr()
    assert cli.main(["history"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("*    2") and "b.yaml" in out
    assert cli.main(["rollback"]) == 0 and "rolled back to generation #1" in capsys.readouterr().out
    assert cli.main(["rollback"]) == 2 and "no generation before #1" in capsys.readouterr().err
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pools"][0]["backends"][0]["backend"] == "10.0.0.1:80"
    assert cli.main(["metrics", "--textfile", str(tmp_path / "m.prom")]) == 0
    assert "nftlb_applies_total 3.0" in (tmp_path / "m.prom").read_text()


def test_every_command_help_has_an_example(capsys):
    for command in cli.app.registered_commands:
        name = command.name or command.callback.__name__.rstrip("_")
        assert cli.main([name, "--help"]) == 0, name
        assert "Example" in capsys.readouterr().out, name


def test_a_new_file_that_plans_the_same_is_recorded_without_a_transaction(tmp_path, kernel, sd):
    ops.apply(write(tmp_path, pools("10.0.0.1:80")), kernel, sd)
    commits = kernel.commits
    text = "health: {interval: 7s}\n" + pools("10.0.0.1:80")  # the watcher must see the new settings
    r = ops.apply(write(tmp_path, text), kernel, sd)
    assert r.action == "in-sync" and kernel.commits == commits
    assert state.load(sd).source_text == text
    assert [e["id"] for e in ops.history(sd)] == [2, 1]
    assert ops.history(sd)[0]["summary"].endswith("the table did not change")
