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


class _Watch(CapacityPolicy):
    """The default policy, recording what it saw: the busy slots of every cluster each time
    a job waits or is placed (called under the dispatcher's lock)."""

    def __init__(self):
        self.seen = []

    def choose(self, job, clusters):
        self.seen.extend((c.name, c.busy, c.slots) for c in clusters)
        return super().choose(job, clusters)


def _busy(d):
    return {c["name"]: c["busy"] for c in d.status()}


def test_a_slot_given_back_when_the_job_ends_goes_to_the_next_job_once():
    """A job gives its slot back as its job ends (twice: idempotent) and then works on
    (gathers): the next job runs on that slot meanwhile; the count never goes below 0 or
    over the slots, and the speed estimate is the job's time, not the gather's."""
    watch = _Watch()
    d = MultiClusterDispatcher([("only", 1, ())], policy=watch)
    a_runs, b_done, log = threading.Event(), threading.Event(), []

    def a(slot):
        a_runs.set()
        time.sleep(0.05)  # the job
        slot.release()
        slot.release()
        log.append(("a released", dict(_busy(d)), d.holding))
        assert b_done.wait(10), "b did not run while a gathered"  # the gather, held
        log.append(("a gathered", dict(_busy(d)), d.holding))
        return "a"

    def b(slot):
        log.append(("b runs", dict(_busy(d)), d.holding))
        b_done.set()
        return "b"
    first = threading.Thread(target=lambda: log.append(d.run_with_slot(JobRequest(), a,
                                                                       lambda e: False)))
    first.start()
    assert a_runs.wait(10)
    assert d.run_with_slot(JobRequest(), b, lambda e: False) == "b"
    first.join(10)
    assert log == [("a released", {"only": 0}, 0), ("b runs", {"only": 1}, 1),
                   ("a gathered", {"only": 0}, 0), "a"]
    assert all(0 <= busy <= slots for _, busy, slots in watch.seen), watch.seen
    status = d.status()[0]
    assert (status["busy"], status["done"]) == (0, 2)
    assert status["seconds_per_job"] < 1.0, "a's 0.05 s job, not its wait for b: %s" % status


def test_a_gather_failing_after_the_early_release_fails_over_without_a_second_release():
    """The job ended (slot given back, taken by another job), then its gather fails for an
    infrastructure reason: the step fails over as before and the other job's slot stays
    counted (no second release); a failed attempt teaches no speed."""
    d = MultiClusterDispatcher([("a", 1, ()), ("b", 1, ())], down_for=60)
    holder_in, holder_go, seen, after_failover = threading.Event(), threading.Event(), [], {}

    def holder(slot):
        holder_in.set()
        assert holder_go.wait(10)
        return slot.cluster
    other = threading.Thread(target=lambda: seen.append(
        ("holder", d.run_with_slot(JobRequest(), holder, lambda e: False, prefer="a"))))

    def gather_fails(slot):
        if slot.attempt == 0:
            slot.release()  # the job ended...
            other.start()
            assert holder_in.wait(10)  # ...another job took the slot...
            raise Infra("link lost during the gather")  # ...and the gather fails
        after_failover.update(_busy(d))
        return slot.cluster

    assert d.run_with_slot(JobRequest(), gather_fails, lambda e: isinstance(e, Infra),
                           prefer="a") == "b"
    assert after_failover == {"a": 1, "b": 1}, "a: the holder's slot, still counted"
    holder_go.set()
    other.join(10)
    assert seen == [("holder", "a")]
    assert _busy(d) == {"a": 0, "b": 0} and d.holding == 0
    status = {c["name"]: c for c in d.status()}
    assert (status["a"]["done"], status["a"]["failed_over"], status["b"]["done"]) == (1, 1, 1)


def test_taking_a_released_slot_again_waits_for_room_and_max_jobs_bounds_all_clusters():
    """A job run again on its cluster after its slot went back (a reconnect found it
    failed) waits for a free slot there; ``max_jobs`` bounds the jobs holding slots across
    clusters (CLOUD_JOBS)."""
    watch = _Watch()
    d = MultiClusterDispatcher([("a", 1, ()), ("b", 4, ())], policy=watch, max_jobs=2)
    most, lock, go = [0], threading.Lock(), threading.Event()

    def job(slot):
        with lock:
            most[0] = max(most[0], d.holding)
        go.wait(10)
        return slot.cluster
    threads = [threading.Thread(target=d.run_with_slot, args=(JobRequest(), job,
                                                              lambda e: False))
               for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert d.holding == 2, "max_jobs 2 with 5 free slots"
    go.set()
    for t in threads:
        t.join(10)
    assert most[0] == 2 and d.holding == 0

    d = MultiClusterDispatcher([("a", 1, ())])
    taken, released, order = threading.Event(), threading.Event(), []

    def again(slot):
        slot.release()
        released.set()
        assert taken.wait(10)
        slot.take()  # waits: the other job holds the only slot
        order.append("taken again")
        slot.take()  # held: a no-op
        assert _busy(d) == {"a": 1}
        return "again"

    def other(slot):
        taken.set()
        time.sleep(0.3)
        order.append("other done")
        return "other"
    t = threading.Thread(target=d.run_with_slot, args=(JobRequest(), again, lambda e: False))
    t.start()
    assert released.wait(10)
    d.run_with_slot(JobRequest(), other, lambda e: False)
    t.join(10)
    assert order == ["other done", "taken again"] and _busy(d) == {"a": 0}
    assert all(0 <= busy <= slots for _, busy, slots in watch.seen)
