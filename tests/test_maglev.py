"""Maglev tables and the kernel's jhash, pure."""

import pytest

from nftlb import maglev


def names(n, weight=1):
    return [(f"10.0.{i // 250}.{i % 250}:80", weight) for i in range(n)]


@pytest.mark.parametrize("n", [10, 100])
def test_default_size_meets_the_balance_target(n):
    size = maglev.default_size((1,) * n)
    assert maglev.is_prime(size) and size > n
    shares = maglev.shares(maglev.table(size, names(n)))
    assert max(shares.values()) * n <= 1.02


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 100])
def test_taking_a_backend_out_moves_only_its_slots(n):
    size = maglev.default_size((1,) * n)
    full = maglev.table(size, names(n))
    for out in [names(n)[0][0], names(n)[-1][0]]:
        less = maglev.table(size, names(n), {out})
        moved = [i for i, (a, b) in enumerate(zip(full, less)) if a != b]
        assert all(full[i] == out for i in moved) and out not in less
        assert len(moved) / size <= 1 / n + 0.01
        assert maglev.table(size, names(n), set()) == full  # coming back restores it exactly


def test_weights_are_honoured():
    size = 4099
    shares = maglev.shares(maglev.table(size, [("a", 1), ("b", 2), ("c", 1)]))
    assert shares["b"] == pytest.approx(0.5, abs=0.002) and shares["a"] == pytest.approx(0.25, abs=0.002)


def test_tables_are_pinned_so_every_box_builds_the_same():
    """Fixed hash functions, fixed turns: these strings must never change between releases or hosts."""
    three = [("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]
    assert "".join(n[7] for n in maglev.table(31, three)) == "3322131331311113322232211232211"
    assert "".join(n[7] for n in maglev.table(31, three, {"10.0.0.2:80"})) == "3331131331311113311133311133311"


def test_default_sizes_for_common_pools():
    assert {n: maglev.default_size((1,) * n) for n in (2, 3, 4, 10, 100)} == {2: 53, 3: 41, 4: 31, 10: 59, 100: 197}


def test_jhash_known_answers():
    # lookup3's published test vectors for hashlittle() (which the kernel's jhash() is, on little endian)
    assert maglev.jhash(b"", 0) == 0xDEADBEEF
    assert maglev.jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert maglev.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert maglev.jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_slot_is_within_the_table():
    seen = {maglev.slot("hash", 0x5EED, 31, "192.0.2.2", p, "198.51.100.10", 80) for p in range(40000, 41000)}
    assert seen == set(range(31))
    assert maglev.slot("source-hash", 1, 31, "192.0.2.2", 1, "198.51.100.10", 80) == \
        maglev.slot("source-hash", 1, 31, "192.0.2.2", 2, "198.51.100.11", 81)
