"""apply's decision, pure: from facts to frozen data, with no kernel and no state dir."""

from nftlb import decide, desired, plan, pools_file
from nftlb.decide import Live

A = "pools:\n  - {name: web, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2]}\n"
B = A + "  - {name: dns, vip: 198.51.100.2, port: 53, protocol: udp, backends: [10.0.0.1]}\n"
TRUSTED, UNKNOWN = Live(True, True, None), Live(True, False, "changed by hand")


def built(text):
    return plan.build(pools_file.parse(text))


def facts(text, applied_text=None, *, table="nftlb", applied_table="nftlb", history_id=1, exists=False):
    applied = applied_text is not None
    return decide.Facts(source="pools.yaml", text=text, table=table, applied_table=applied_table if applied else None,
                        applied_source=("pools.yaml", applied_text) if applied else None,
                        applied_history_id=history_id if applied else None,
                        believed=built(applied_text) if applied else None, old_table_exists=exists,
                        next_history_id=7, now=1.0)


def run(text, applied_text=None, live=TRUSTED, *, dry_run=False, rollback_to=None):
    want = built(text)
    return decide.decide(want, desired.summary(want), live, facts(text, applied_text), dry_run=dry_run,
                         rollback_to=rollback_to)


def test_nothing_to_do_and_a_comment_only_moves_the_record():
    d = run(A, A)
    assert (d.action, d.kind, d.entry, d.transaction) == ("in-sync", "none", None, "")
    d = run(A, "# a comment\n" + A)
    assert (d.action, d.kind, d.history_id) == ("in-sync", "record", 7)
    assert d.entry["summary"] == "1 pools, 2 backends; the table did not change" and d.entry_after == 1


def test_a_trusted_table_gets_a_small_transaction_an_unknown_one_the_whole():
    d = run(B, A)
    assert (d.action, d.kind, d.added, d.transaction) == ("applied", "small", ("dns",), "1 pools")
    assert d.old == built(A) and d.believed == built(A) and d.history_id == 7
    assert d.entry["summary"] == "2 pools, 3 backends; added dns" and d.entry["source_text"] == B
    d = run(B, A, live=UNKNOWN)
    assert (d.kind, d.old, d.transaction) == ("whole", None, "whole table")
    assert d.believed == built(A)  # stale conntrack entries are judged against what was believed live
    assert run(B, None, live=Live(False, False, None)).kind == "whole"


def test_dry_run_and_rollback():
    assert run(B, A, dry_run=True).action == "dry-run"
    d = run(A, B, rollback_to={"id": 3})
    assert (d.kind, d.history_id, d.entry, d.removed) == ("small", 3, None, ("dns",))  # points at the entry
    d = run(A, A, rollback_to={"id": 3})
    assert (d.kind, d.history_id, d.entry) == ("record", 3, None)


def test_a_renamed_table_retires_the_old_one_when_it_is_there():
    renamed = "table: lb2\n" + A
    want = built(renamed)
    f = facts(renamed, A, table="lb2", exists=True)
    d = decide.decide(want, desired.summary(want), Live(False, False, None), f, dry_run=False)
    assert (d.kind, d.retire, d.believed) == ("whole", "nftlb", None)
    f = facts(renamed, A, table="lb2", exists=False)
    assert decide.decide(want, desired.summary(want), Live(False, False, None), f, dry_run=False).retire is None
