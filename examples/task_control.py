"""Task control on ferroloop: wait with its three return conditions, cancellation, timing.

Run with `make demo`. Each "fetch" stands for an I/O call with its own latency (the
network walkthrough with a local HTTP server and httpx comes with ferroloop's network
layer); everything else is real asyncio task control, run on a ferroloop loop.
"""

import asyncio
import random
import time

import ferroloop

POSTS = {
    i: f"Post number {i}: {random.Random(i).choice(['alpha', 'beta', 'gamma'])}"
    for i in range(1, 9)
}
DELAYS = {i: 0.005 * ((i * 5) % 8 + 1) for i in POSTS}  # 5 ms .. 40 ms, varied


class FetchError(Exception):
    pass


async def fetch(post_id: int, fail_on: int = 0) -> str:
    await asyncio.sleep(DELAYS[post_id])
    if post_id == fail_on:
        raise FetchError(f"post {post_id}: server error 500")
    return POSTS[post_id]


async def all_completed():
    print("1. asyncio.wait(ALL_COMPLETED): titles in completion order")
    tasks = {asyncio.create_task(fetch(i), name=f"post-{i}") for i in POSTS}
    order = []
    for t in tasks:
        t.add_done_callback(lambda t: order.append(t))
    done, pending = await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
    for t in order:
        print(f"   {t.get_name():8} {t.result()}")
    print(f"   done={len(done)} pending={len(pending)}")


async def first_completed():
    print("2. asyncio.wait(FIRST_COMPLETED): take the first answer, cancel the rest")
    tasks = [asyncio.create_task(fetch(i), name=f"post-{i}") for i in (3, 5, 8)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    (first,) = done
    print(f"   first: {first.get_name()} -> {first.result()}")
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    print(f"   cancelled: {sorted(t.get_name() for t in pending if t.cancelled())}")


async def first_exception():
    print("3. asyncio.wait(FIRST_EXCEPTION): stop at the first failure")
    tasks = [asyncio.create_task(fetch(i, fail_on=4), name=f"post-{i}") for i in POSTS]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    print(f"   failed: {failed[0].get_name()}: {failed[0].exception()}")
    print(f"   finished before it: {len(done) - len(failed)}, still running: {len(pending)}")
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def cancel_with_cleanup():
    print("4. a task that catches CancelledError, cleans up, and re-raises")
    log = []

    async def worker():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as exc:
            log.append(f"cleanup ran (message: {exc.args[0] if exc.args else None!r})")
            raise

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    task.cancel("demo shutdown")
    try:
        await task
    except asyncio.CancelledError:
        log.append("CancelledError reached the awaiter")
    for line in log:
        print(f"   {line}")
    print(f"   task.cancelled() = {task.cancelled()}")


async def walkthrough():
    await all_completed()
    await first_completed()
    await first_exception()
    await cancel_with_cleanup()


async def workload(rounds: int = 300, width: int = 50):
    """Pure task control: many waits with each return condition, and cancellations."""

    async def job(i):
        for _ in range(i % 3):
            await asyncio.sleep(0)
        return i

    for r in range(rounds):
        tasks = [asyncio.create_task(job(i)) for i in range(width)]
        mode = (asyncio.ALL_COMPLETED, asyncio.FIRST_COMPLETED, asyncio.FIRST_EXCEPTION)[r % 3]
        _done, pending = await asyncio.wait(tasks, return_when=mode)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def timed(loop_factory) -> float:
    loop = loop_factory()
    try:
        t0 = time.perf_counter()
        loop.run_until_complete(workload())
        return time.perf_counter() - t0
    finally:
        loop.close()


def main():
    print(f"ferroloop {ferroloop.__version__}: task control walkthrough\n")
    ferroloop.run(walkthrough())
    print("\n5. the same task-control workload on both loops (best of 3)")
    t_asyncio = min(timed(asyncio.new_event_loop) for _ in range(3))
    t_ferro = min(timed(ferroloop.new_event_loop) for _ in range(3))
    print(f"   asyncio   {t_asyncio * 1e3:8.1f} ms")
    print(f"   ferroloop {t_ferro * 1e3:8.1f} ms   ({t_asyncio / t_ferro:.2f}x asyncio)")


if __name__ == "__main__":
    main()
