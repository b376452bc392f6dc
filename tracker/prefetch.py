"""SAM's embedding of the frame a page shows, made on a CPU while its user looks at it.

On a CPU SAM's image encoder takes seconds (5 to 8 s for ViT-B on 2 cores),
and the first click on a frame waited for all of it. A frame that stays on
the page for a moment is the one its user is about to click, so its
embedding is made then, by one thread for the whole app (the cores are
shared): a click on that frame finds it made, or waits for the rest of it.
Anything that needs SAM or the cores now (a click on another frame, any call
waiting for SAM such as an Undo's decoder or another user's click, a job)
stops it between two of the encoder's blocks, a fraction of a second; it
begins again once that work is done, if the page still shows the frame.
Once a click waits for it, it is that click's and goes on as its own would.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Protocol

log = logging.getLogger(__name__)

SETTLE_SECONDS = 1.0  # how long a frame stays on the page before its embedding is begun (a slider's drag passes)


class Prefetching(Protocol):
    """What the prefetch asks of a page's session (`tracker.interactive.EditSession`)."""

    def embed_ahead(self, frame: int, stop: Callable[[], bool], ahead: Callable[[], bool]) -> bool:
        """Embed `frame` unless `stop` says to give it up, giving way to calls that need SAM while `ahead()`
        (`SamBackend.embed`); False: not now (SAM was busy, or needed by other work that stopped it), ask
        again."""


class EmbeddingPrefetch:
    """Embeds the frames pages show once they settle, one at a time, oldest first, while no job holds the device.

    `device_busy` says whether a job holds (or waits for) the device: prefetching waits for it to end, and
    stops when one begins (unless a click waits for the embedding).
    """

    def __init__(self, device_busy: Callable[[], bool], settle_seconds: float = SETTLE_SECONDS):
        self.device_busy = device_busy
        self.settle_seconds = settle_seconds
        self._changed = threading.Condition()
        self._wanted: OrderedDict[Prefetching, tuple[int, float]] = OrderedDict()  # session -> (frame, shown at)
        self._running: tuple[Prefetching, int] | None = None
        self._claimed = False  # a click waits for the running embedding: it goes on whatever the page shows
        self._stop = threading.Event()  # stops the running embedding
        self._closed = False
        threading.Thread(target=self._run, name="sam-prefetch", daemon=True).start()

    def want(self, session: Prefetching, frame: int) -> None:
        """`session`'s page shows `frame` from now on (in place of any frame it showed before)."""
        with self._changed:
            self._wanted[session] = (frame, time.monotonic())
            self._wanted.move_to_end(session)
            if self._running is not None and self._running[0] is session and self._running[1] != frame \
                    and not self._claimed:
                self._stop.set()
            self._changed.notify_all()

    def yield_to(self, session: Prefetching, frame: int | None) -> None:
        """SAM is needed now by `session`, for a click on `frame` (None: other work), and `session` wants no
        frame. The running embedding stops, unless it is of that very frame (the click then waits for it) or
        a click waits for it already (stopped, it would only have to begin again)."""
        with self._changed:
            self._wanted.pop(session, None)
            if self._running == (session, frame):
                self._claimed = True
            elif self._running is not None and not self._claimed:
                self._stop.set()

    def drop(self, session: Prefetching) -> None:
        """`session` ended: nothing more is embedded for it."""
        with self._changed:
            self._wanted.pop(session, None)
            if self._running is not None and self._running[0] is session:
                self._stop.set()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._wanted.clear()
            self._stop.set()
            self._changed.notify_all()

    def _stopped(self) -> bool:
        return self._stop.is_set() or (not self._claimed and self.device_busy())

    def _ahead(self) -> bool:
        """Whether the running embedding is still only ahead of need: no click waits for it."""
        return not self._claimed

    def _run(self) -> None:
        while (job := self._next()) is not None:
            session, frame = job
            done = True
            try:
                done = session.embed_ahead(frame, self._stopped, self._ahead)
            except Exception:  # the click will meet it again, and say it: this thread goes on for the others
                log.warning("SAM's embedding of frame %d, made ahead, failed", frame, exc_info=True)
            finally:
                with self._changed:
                    self._running = None
                    if not done and session not in self._wanted:
                        self._wanted[session] = (frame, time.monotonic())

    def _next(self) -> tuple[Prefetching, int] | None:
        """The oldest wanted frame that has settled, once no job holds the device; None when closed."""
        with self._changed:
            while not self._closed:
                if not self._wanted:
                    self._changed.wait()
                    continue
                if self.device_busy():  # asked again until the job ends: it may run for hours
                    self._changed.wait(0.5)
                    continue
                session, (frame, shown_at) = next(iter(self._wanted.items()))
                wait = shown_at + self.settle_seconds - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                del self._wanted[session]
                self._running, self._claimed = (session, frame), False
                self._stop.clear()
                return session, frame
            return None
