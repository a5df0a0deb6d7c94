"""Exception handling: the handler API, the default handler, BaseExceptions that propagate."""

import asyncio
import gc
import logging

import pytest
from parity_helpers import run_briefly


def fail_with_value_error():
    raise ValueError("callback failed")


def test_exception_handler_defaults_to_none(loop):
    assert loop.get_exception_handler() is None


def test_set_and_get_exception_handler(loop):
    def handler(lp, context):
        pass

    loop.set_exception_handler(handler)
    assert loop.get_exception_handler() is handler
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None


def test_set_exception_handler_rejects_non_callables(loop):
    with pytest.raises(TypeError):
        loop.set_exception_handler("not callable")
    assert loop.get_exception_handler() is None


def test_custom_handler_is_called_with_loop_and_context(loop):
    calls = []
    loop.set_exception_handler(lambda lp, context: calls.append((lp, context)))
    handle = loop.call_soon(fail_with_value_error)
    run_briefly(loop)
    assert len(calls) == 1
    lp, context = calls[0]
    assert lp is loop
    assert {"message", "exception", "handle"} <= set(context)
    assert context["message"].startswith("Exception in callback ")
    assert "fail_with_value_error" in context["message"]
    assert isinstance(context["exception"], ValueError)
    assert str(context["exception"]) == "callback failed"
    assert context["handle"] is handle


def test_timer_callback_exception_reaches_the_handler(loop):
    calls = []
    loop.set_exception_handler(lambda lp, context: calls.append(context))
    handle = loop.call_later(0, fail_with_value_error)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert len(calls) == 1
    assert calls[0]["handle"] is handle
    assert isinstance(calls[0]["exception"], ValueError)


def test_a_raising_callback_does_not_stop_the_loop(loop):
    out = []
    loop.set_exception_handler(lambda lp, context: out.append("handled"))
    loop.call_soon(fail_with_value_error)
    loop.call_soon(out.append, "after")
    loop.call_soon(loop.call_soon, out.append, "next-turn")
    run_briefly(loop, turns=2)
    assert out == ["handled", "after", "next-turn"]


def test_default_handler_logs_to_the_asyncio_logger(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.call_soon(fail_with_value_error)
    run_briefly(loop)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.ERROR
    assert "Exception in callback" in record.getMessage()
    assert "fail_with_value_error" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError


def test_call_exception_handler_with_the_default_handler(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.call_exception_handler({"message": "something odd", "custom_key": "custom-value"})
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    assert "something odd" in records[0].getMessage()
    assert "custom_key: 'custom-value'" in records[0].getMessage()


def test_call_exception_handler_with_a_custom_handler(loop):
    calls = []
    loop.set_exception_handler(lambda lp, context: calls.append((lp, context)))
    context = {"message": "direct", "exception": KeyError("x")}
    loop.call_exception_handler(context)
    assert calls == [(loop, context)]


def test_custom_handler_can_delegate_to_the_default(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop.set_exception_handler(lambda lp, context: lp.default_exception_handler(context))
    loop.call_soon(fail_with_value_error)
    run_briefly(loop)
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(messages) == 1
    assert "Exception in callback" in messages[0]


def test_a_failing_handler_is_logged_and_the_loop_continues(loop, caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    out = []

    def bad_handler(lp, context):
        raise RuntimeError("handler broke")

    loop.set_exception_handler(bad_handler)
    loop.call_soon(fail_with_value_error)
    loop.call_soon(out.append, "after")
    run_briefly(loop)
    assert out == ["after"]
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any("Unhandled error in exception handler" in m for m in messages)


def test_task_exception_handler_context_for_unretrieved_future(loop):
    calls = []
    loop.set_exception_handler(lambda lp, context: calls.append(context))

    async def main():
        fut = loop.create_future()
        fut.set_exception(ValueError("never retrieved"))
        del fut

    loop.run_until_complete(main())
    gc.collect()
    assert any(isinstance(c.get("exception"), ValueError) for c in calls)
    assert any("exception was never retrieved" in c["message"] for c in calls)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_callback_propagates_out_of_run_forever(loop, exc_type):
    handled = []
    loop.set_exception_handler(lambda lp, context: handled.append(context))

    def raiser():
        raise exc_type()

    loop.call_soon(raiser)
    with pytest.raises(exc_type):
        loop.run_forever()
    assert handled == []
    assert not loop.is_running()
    assert asyncio._get_running_loop() is None
    # The loop is still usable afterwards.
    loop.call_soon(loop.stop)
    loop.run_forever()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_callback_propagates_out_of_run_until_complete(loop, exc_type):
    def raiser():
        raise exc_type()

    async def main():
        loop.call_soon(raiser)
        await asyncio.sleep(0.01)
        return "finished"

    task = loop.create_task(main())
    with pytest.raises(exc_type):
        loop.run_until_complete(task)
    assert not loop.is_running()
    # The task was interrupted, not finished; finishing it works.
    assert loop.run_until_complete(task) == "finished"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_a_task_propagates(loop, exc_type):
    async def main():
        await asyncio.sleep(0)
        raise exc_type()

    with pytest.raises(exc_type):
        loop.run_until_complete(main())
    assert not loop.is_running()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_a_timer_callback_propagates(loop, exc_type):
    def raiser():
        raise exc_type()

    loop.call_later(0, raiser)
    with pytest.raises(exc_type):
        loop.run_forever()
    assert not loop.is_running()


def test_exception_in_a_callback_keeps_its_traceback(loop):
    calls = []
    loop.set_exception_handler(lambda lp, context: calls.append(context))
    loop.call_soon(fail_with_value_error)
    run_briefly(loop)
    tb = calls[0]["exception"].__traceback__
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "fail_with_value_error" in names
