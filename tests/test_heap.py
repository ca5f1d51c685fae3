"""The heap-trimming wrapper of the stage loops (tasks/stages/common.trimmed): a trim only when
the level after an item has grown by more than the slack above the level after the first item
(or the first after the last trim), never for a working set that is the same every item."""

import tasks.stages.common as common


def run(levels, slack=32.0, monkeypatch=None):
    """Feed items whose post-item resident levels are `levels`; the items after which a trim
    happened."""
    it = iter(levels)
    trims = []
    monkeypatch.setattr(common, "resident_mib", lambda: next(it))
    monkeypatch.setattr(common, "trim_heap", lambda: trims.append(current[0]) or True)
    current = [None]
    for i in common.trimmed(range(len(levels)), slack):
        current[0] = i
    return trims


def test_a_steady_working_set_is_never_trimmed(monkeypatch):
    assert run([900.0, 930.0, 905.0, 931.0, 910.0], monkeypatch=monkeypatch) == []


def test_growth_past_the_slack_is_trimmed_and_the_next_level_is_the_floor(monkeypatch):
    # 900 after item 0; item 3 is 40 above: trim; item 4 sets the floor (920); item 5 is
    # within it; item 6 is 33 above it: trim.
    levels = [900.0, 910.0, 925.0, 940.0, 920.0, 950.0, 953.0]
    assert run(levels, monkeypatch=monkeypatch) == [3, 6]


def test_the_real_process_reads_its_resident_memory():
    assert common.resident_mib() > 10  # this pytest process, torch loaded
    common.trim_heap()  # callable here (glibc), whatever it returns
