"""asyncio's synchronisation primitives and queues running on each loop.

The primitives are created inside coroutines, so on 3.9 they bind to the running loop.
"""

import asyncio

import pytest


def test_event_wakes_all_waiters(loop):
    async def main():
        event = asyncio.Event()
        woken = []

        async def waiter(i):
            await event.wait()
            woken.append(i)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert woken == [] and not event.is_set()
        event.set()
        await asyncio.gather(*tasks)
        event.clear()
        return sorted(woken), event.is_set()

    assert loop.run_until_complete(main()) == ([0, 1, 2], False)


def test_event_wait_returns_immediately_when_set(loop):
    async def main():
        event = asyncio.Event()
        event.set()
        return await event.wait()

    assert loop.run_until_complete(main()) is True


def test_lock_serialises_critical_sections(loop):
    async def main():
        lock = asyncio.Lock()
        trace = []

        async def critical(name):
            async with lock:
                trace.append(("enter", name))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                trace.append(("exit", name))

        await asyncio.gather(*(critical(n) for n in "abc"))
        return trace, lock.locked()

    trace, locked = loop.run_until_complete(main())
    assert locked is False
    # Enter/exit pairs never interleave, and waiters are served in FIFO order.
    assert trace == [(kind, n) for n in "abc" for kind in ("enter", "exit")]


def test_lock_release_when_unlocked_raises(loop):
    async def main():
        lock = asyncio.Lock()
        with pytest.raises(RuntimeError):
            lock.release()
        await lock.acquire()
        assert lock.locked()
        lock.release()
        return lock.locked()

    assert loop.run_until_complete(main()) is False


def test_cancelled_lock_waiter_does_not_take_the_lock(loop):
    async def main():
        lock = asyncio.Lock()
        await lock.acquire()
        waiter = asyncio.ensure_future(lock.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        lock.release()
        await asyncio.sleep(0)
        return waiter.cancelled(), lock.locked()

    assert loop.run_until_complete(main()) == (True, False)


def test_semaphore_limits_concurrency(loop):
    async def main():
        sem = asyncio.Semaphore(2)
        active = 0
        peak = 0

        async def worker():
            nonlocal active, peak
            async with sem:
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.001)
                active -= 1

        await asyncio.gather(*(worker() for _ in range(6)))
        return peak, sem.locked()

    assert loop.run_until_complete(main()) == (2, False)


def test_bounded_semaphore_over_release_raises(loop):
    async def main():
        sem = asyncio.BoundedSemaphore(1)
        await sem.acquire()
        sem.release()
        with pytest.raises(ValueError):
            sem.release()
        return True

    assert loop.run_until_complete(main()) is True


def test_condition_notify_and_wait_for(loop):
    async def main():
        cond = asyncio.Condition()
        items = []
        got = []

        async def consumer():
            async with cond:
                await cond.wait_for(lambda: items)
                got.append(items.pop())

        consumers = [asyncio.ensure_future(consumer()) for _ in range(2)]
        await asyncio.sleep(0)
        for item in ("x", "y"):
            async with cond:
                items.append(item)
                cond.notify()
            await asyncio.sleep(0)
        await asyncio.gather(*consumers)
        return sorted(got)

    assert loop.run_until_complete(main()) == ["x", "y"]


def test_condition_notify_all(loop):
    async def main():
        cond = asyncio.Condition()
        woken = []

        async def waiter(i):
            async with cond:
                await cond.wait()
                woken.append(i)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        async with cond:
            cond.notify_all()
        await asyncio.gather(*tasks)
        return sorted(woken)

    assert loop.run_until_complete(main()) == [0, 1, 2]


def test_condition_wait_without_the_lock_raises(loop):
    async def main():
        cond = asyncio.Condition()
        with pytest.raises(RuntimeError):
            await cond.wait()
        return True

    assert loop.run_until_complete(main()) is True


def test_queue_producer_consumer(loop):
    async def main():
        queue = asyncio.Queue(maxsize=2)
        got = []

        async def producer():
            for i in range(5):
                await queue.put(i)
            await queue.put(None)

        async def consumer():
            while (item := await queue.get()) is not None:
                got.append(item)
                queue.task_done()
            queue.task_done()

        await asyncio.gather(producer(), consumer())
        await queue.join()
        return got, queue.empty()

    assert loop.run_until_complete(main()) == ([0, 1, 2, 3, 4], True)


def test_queue_nowait_errors(loop):
    async def main():
        queue = asyncio.Queue(maxsize=1)
        with pytest.raises(asyncio.QueueEmpty):
            queue.get_nowait()
        queue.put_nowait(1)
        assert queue.full()
        with pytest.raises(asyncio.QueueFull):
            queue.put_nowait(2)
        return queue.get_nowait()

    assert loop.run_until_complete(main()) == 1


def test_priority_and_lifo_queues(loop):
    async def main():
        pq = asyncio.PriorityQueue()
        lq = asyncio.LifoQueue()
        for i in (3, 1, 2):
            await pq.put(i)
            await lq.put(i)
        return [pq.get_nowait() for _ in range(3)], [lq.get_nowait() for _ in range(3)]

    assert loop.run_until_complete(main()) == ([1, 2, 3], [2, 1, 3])


def test_queue_get_with_timeout(loop):
    async def main():
        queue = asyncio.Queue()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=0.01)
        # A cancelled getter leaves the queue usable.
        queue.put_nowait("after")
        return await queue.get()

    assert loop.run_until_complete(main()) == "after"
