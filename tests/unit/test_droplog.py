"""The rate limit on drop-counter log lines: one line per interval at most, naming each reason
that grew with how much, whatever the flood."""

from __future__ import annotations

from flannel_udp.droplog import DropLog


def test_the_first_snapshot_is_the_baseline_and_says_nothing():
    log = DropLog(10)
    assert log.update({"short": 5, "unknown_sender": 7}, now=0.0) is None
    assert log.update({"short": 5, "unknown_sender": 7}, now=20.0) is None


def test_every_reason_that_grew_is_named_in_one_line_with_its_increase():
    log = DropLog(10)
    log.update({"short": 5, "unknown_sender": 0, "no_route": 1}, now=0.0)
    line = log.update({"short": 6, "unknown_sender": 100, "no_route": 1}, now=1.0)
    assert line is not None and "\n" not in line
    assert "short +1" in line and "unknown_sender +100" in line and "no_route" not in line


def test_a_flood_gives_one_line_per_interval_and_loses_no_count():
    log = DropLog(10)
    log.update({"unknown_sender": 0}, now=0.0)
    lines = []
    for tick in range(1, 301):  # 30 s of a flood, a snapshot every 0.1 s
        line = log.update({"unknown_sender": tick * 1000}, now=tick / 10)
        if line:
            lines.append(line)
    assert len(lines) == 3
    # Lines at 0.1, 10.1 and 20.1 s, each with the whole growth since the one before; what
    # came after 20.1 s waits for the next line.
    reported = sum(int(line.rsplit("+", 1)[1]) for line in lines)
    assert reported == 201_000
    assert log.update({"unknown_sender": 300_000}, now=30.1) == (
        "dropped since last reported (at most every 10 s): unknown_sender +99000")


def test_a_reason_new_to_the_snapshot_and_a_counter_that_went_back_are_handled():
    log = DropLog(10)
    log.update({"short": 50}, now=0.0)
    assert log.update({"short": 3}, now=1.0) is None  # fast path restarted: new baseline
    assert log.update({"short": 4, "spoofed_inner_source": 2}, now=2.0) == (
        "dropped since last reported (at most every 10 s): short +1, spoofed_inner_source +2")
