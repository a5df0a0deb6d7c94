"""asyncio's Handle/TimerHandle repr, for ferroloop's native handles."""

from . import _compat


def handle_repr(h):
    if h._repr is not None:
        return h._repr
    info = [type(h).__name__]
    if h._cancelled:
        info.append("cancelled")
    if h._is_timer:
        info.insert(2 if h._cancelled else 1, f"when={h._when}")
    if h._callback is not None:
        info.append(_compat.format_callback_source(h._callback, h._args, h._loop))
    if h._source_traceback:
        frame = h._source_traceback[-1]
        info.append(f"created at {frame[0]}:{frame[1]}")
    return "<{}>".format(" ".join(info))


__all__ = ("handle_repr",)
