"""The dispatcher and the default policy, with real threads and timed work."""
import threading
import time
from collections import Counter

import pytest

from scipion_cloudexec.scheduling.dispatcher import MultiClusterDispatcher, NoClusterLeft
from scipion_cloudexec.scheduling.policy import CapacityPolicy, ClusterView, JobRequest


class Infra(Exception):
    pass


def run_many(dispatcher, n, work, is_infra=lambda e: isinstance(e, Infra)):
    results, errors = [], []

    def one(i):
        try:
            results.append(dispatcher.run(JobRequest(), lambda name, attempt: work(name, i),
                                          is_infra))
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_split_follows_capacity():
    d = MultiClusterDispatcher([("small", 1, ()), ("mid", 2, ()), ("big", 4, ())])

    def work(name, i):
        time.sleep(0.05)
        return name
    results, errors = run_many(d, 70, work)
    counts = Counter(results)
    assert not errors and sum(counts.values()) == 70
    assert counts["big"] > counts["mid"] > counts["small"] > 0, counts
    assert counts["big"] >= 2.5 * counts["small"], counts


def test_infrastructure_failure_moves_the_job_program_failure_does_not():
    d = MultiClusterDispatcher([("flaky", 4, ()), ("solid", 1, ())], down_for=60)
    seen = []

    def work(name, attempt):
        seen.append(name)
        if name == "flaky":
            raise Infra("agent lost")
        return name
    assert d.run(JobRequest(), work, lambda e: isinstance(e, Infra)) == "solid"
    assert seen == ["flaky", "solid"]
    assert [c["healthy"] for c in d.status()] == [False, True]

    def failing(name, attempt):
        seen.append(name)
        raise ValueError("segfault in the program")
    seen.clear()
    with pytest.raises(ValueError):
        d.run(JobRequest(), failing, lambda e: isinstance(e, Infra))
    assert seen == ["solid"], "a program failure is not retried"


def test_all_clusters_failing_gives_up_after_the_retries():
    d = MultiClusterDispatcher([("a", 1, ()), ("b", 1, ())], retries=1, down_for=0.01)

    def work(name, attempt):
        raise Infra("down")
    with pytest.raises(NoClusterLeft, match="giving up after 2 attempt"):
        d.run(JobRequest(), work, lambda e: isinstance(e, Infra))


def test_a_failure_waiting_will_not_cure_gives_up_at_once_when_no_other_cluster_is_up():
    d = MultiClusterDispatcher([("only", 1, ())], retries=2, down_for=30.0)
    tries = []

    def work(name, attempt):
        tries.append(name)
        raise Infra("Connection refused")
    with pytest.raises(NoClusterLeft, match="giving up: cluster only cannot be used.*refused"):
        d.run(JobRequest(), work, lambda e: isinstance(e, Infra), is_permanent=lambda e: True)
    assert tries == ["only"], "no 30 s waits for a cluster that refuses connections"
    d = MultiClusterDispatcher([("bad", 1, ()), ("good", 1, ())], retries=2, down_for=30.0)

    def one_bad(name, attempt):
        if name == "bad":
            raise Infra("Connection refused")
        return name
    got = [d.run(JobRequest(), one_bad, lambda e: isinstance(e, Infra), prefer="bad",
                 is_permanent=lambda e: True)]
    assert got == ["good"], "with another cluster up, the job moves there"


def test_a_lost_cluster_takes_work_again_after_its_pause():
    d = MultiClusterDispatcher([("a", 4, ()), ("b", 1, ())], retries=0, down_for=0.2)

    def work(name, attempt):
        raise Infra("link down")
    with pytest.raises(NoClusterLeft):
        d.run(JobRequest(), work, lambda e: isinstance(e, Infra))
    assert [c["healthy"] for c in d.status()] == [False, True]
    time.sleep(0.3)
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False) == "a", "back, and the biggest"


def test_policy_prefers_faster_and_data_holding_clusters():
    p = CapacityPolicy()
    views = [ClusterView("slow", 8, 0, seconds_per_job=10.0),
             ClusterView("fast", 8, 0, seconds_per_job=2.0)]
    assert p.choose(JobRequest(), views) == "fast"
    views = [ClusterView("a", 8, 0), ClusterView("b", 8, 0, cached_bytes=10 ** 9)]
    assert p.choose(JobRequest(), views) == "b"
    assert p.choose(JobRequest(ranks=4), [ClusterView("full", 8, 6)]) is None
    assert p.choose(JobRequest(ranks=16), [ClusterView("idle-small", 8, 0)]) == "idle-small"


def test_a_resumed_job_goes_back_where_it_was_sent():
    d = MultiClusterDispatcher([("small", 1, ()), ("big", 8, ())], down_for=60)
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False) == "big"
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False, prefer="small") == "small"

    def lost_there(name, attempt):
        if name == "small":
            raise Infra("gone")
        return name
    assert d.run(JobRequest(), lost_there, lambda e: isinstance(e, Infra),
                 prefer="small") == "big", "a lost preferred cluster is not insisted on"


def test_clusters_holding_the_data_are_preferred_when_speed_does_not_decide():
    held = {"a": 0, "b": 10 ** 9}
    d = MultiClusterDispatcher([("a", 4, ()), ("b", 4, ())], cached=lambda n: held[n])
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False) == "b"
    held.update(a=2 * 10 ** 9)
    assert d.run(JobRequest(), lambda n, a: n, lambda e: False) == "a"


def test_failover_message_of_an_error_without_text():
    """paramiko raises a bare EOFError() when the link drops mid-packet: the failover's log
    line took its first line and failed the step with IndexError (found by the soak)."""
    from scipion_cloudexec.executors.cloud import first_line
    assert first_line(EOFError()) == "(no message)"
    assert first_line(OSError("Socket is closed\nmore")) == "Socket is closed"
