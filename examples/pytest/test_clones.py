"""Three tests, each on its own clone of one golden snapshot: each changes its clone's disk
and memory, and none sees a trace of the others."""

OFFSET = "8M"
MARKERS = {"a": 0xA1, "b": 0xB2, "c": 0xC3}


def _check_clean_then_mark(qsnap, clone, me: str) -> None:
    # Nothing any other test wrote, on disk or in memory: the clone is the golden instant.
    for other, pattern in MARKERS.items():
        assert not clone.disk_has(qsnap, pattern, OFFSET), f"disk shows test {other}'s write"
        assert not clone.memory_file_exists(f"/marker-{other}"), f"memory shows test {other}'s file"
    clone.disk_write(qsnap, MARKERS[me], OFFSET)
    clone.write_memory_file(f"/marker-{me}", f"written by test {me}")
    assert clone.disk_has(qsnap, MARKERS[me], OFFSET)
    assert clone.memory_file_exists(f"/marker-{me}")
    assert "MISMATCH" not in clone.console.read_text(errors="replace")


def test_a(qsnap, clone):
    _check_clean_then_mark(qsnap, clone, "a")


def test_b(qsnap, clone):
    _check_clean_then_mark(qsnap, clone, "b")


def test_c(qsnap, clone):
    _check_clean_then_mark(qsnap, clone, "c")
