"""AsyncEngine: the LLMEngine stepping in a background thread, one asyncio stream per request.

Only the engine thread touches the engine. Callers submit commands (add / abort) through a
thread-safe queue; the loop applies them between steps, so an abort frees the request's KV
blocks before the next step runs. Outputs travel back to each request's asyncio.Queue with
`loop.call_soon_threadsafe`.

The loop is supervised: an exception inside a step fails the requests of that step and the loop
goes on; anything else that escapes (a bug outside a step) marks the engine dead, which turns
/health to 503 and fails every waiter and every open stream at once. A caller that goes away
while its request is being added (a cancelled future) never disturbs the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import threading
import time
from typing import Any

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.request_stream import RequestStream
from tokenmill.lora_request import LoRARequest
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


TRIM_INTERVAL_S = 30.0  # how often a busy engine loop hands freed heap pages back to the OS


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_openmp_threads() -> bool:
    """Hand back the calling thread's OpenMP worker threads; True if the runtime took the call.

    torch's parallel regions run on a pool of worker threads owned by the thread that starts
    them, and GNU OpenMP counts the workers of every pool against the CPUs. The thread that
    loaded the model (its repacking ran in parallel) keeps its pool after handing the steps to
    the engine thread, whose own pool then brings the count past the CPUs: libgomp then cuts
    every worker's spin-wait between parallel regions to ~100 iterations, and each of a step's
    hundreds of regions pays a futex wake-up. On 2 cores the engine thread decoded the default
    model at batch 1 in 9-10 ms a token instead of 5-7. omp_pause_resource_all (OpenMP 5.0,
    soft pause) frees this thread's pool; a parallel region started here later makes a new one.
    Runtimes are looked up among the loaded libraries only (RTLD_NOLOAD).
    """
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        pause = getattr(lib, "omp_pause_resource_all", None)
        if pause is not None:
            return pause(1) == 0  # omp_pause_soft
    return False


def num_sequences(params: SamplingParams | PoolingParams) -> int:
    """Sequences a request adds to the queue: its n samples (an embedding request: one)."""
    return params.n if isinstance(params, SamplingParams) else 1


class EngineOverloadedError(RuntimeError):
    """The bounded waiting queue is full; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shutdown or a fatal error)."""


class AsyncEngine:
    """Runs `engine.step()` in a thread while requests arrive and leave from asyncio code."""

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int = 1024,
        stream_stall_timeout: float = 60.0,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stream_stall_timeout = stream_stall_timeout
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self.dead: BaseException | None = None
        self._last_busy = 0.0  # when the loop last had work (monotonic)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread. The calling thread (which built the engine) hands back its
        OpenMP workers first: from now on the steps' parallel regions start on the engine
        thread (`release_openmp_threads`)."""
        release_openmp_threads()
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then the engine's tensor-parallel ranks (if any; with the
        thread still in a step after `timeout`, they are left to the exit)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    @property
    def num_waiting(self) -> int:
        """Sequences waiting (each of a request's n samples counts), queued adds included."""
        return self.engine.num_waiting_sequences + self._pending_adds

    # ---- the API used by the server -------------------------------------------------------
    async def add_request(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams | PoolingParams,
        request_id: str,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Queue a request (PoolingParams: an embedding request, whose stream yields one
        EmbeddingRequestOutput); returns once the engine accepted it.

        Raises ValueError (bad input), EngineOverloadedError (waiting queue full) or
        EngineDeadError. Iterate the returned stream for outputs; closing it early aborts.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        n = num_sequences(params)
        with self._lock:
            if self.num_waiting + n > self.max_waiting_requests:
                raise EngineOverloadedError(
                    f"the server is overloaded: {self.num_waiting} sequences are already waiting"
                )
            self._pending_adds += n
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            # Compile off the engine thread (and off this loop) first: a constraint that does
            # not compile is a ValueError for this caller, and the engine finds it cached.
            try:
                await asyncio.wrap_future(
                    self.engine.structured_outputs.submit(params.structured_outputs)
                )
            except BaseException:
                with self._lock:
                    self._pending_adds -= n
                raise
        stream = RequestStream(
            self, request_id, asyncio.get_running_loop(), self.stream_stall_timeout
        )
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._streams[request_id] = stream
        self._submit(("add", request_id, prompt, prompt_token_ids, params, lora_request, added))
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # cancelled while queued: make sure it does not run
            raise
        return stream

    def detach(self, request_id: str) -> None:
        """Stop routing the request's outputs to its stream (`RequestStream.close`)."""
        self._streams.pop(request_id, None)

    async def call(self, fn: Any, *args: Any) -> Any:
        """fn(*args) run on the engine thread between two steps (for what changes the engine's
        state, e.g. `LLMEngine.add_lora`): its result, or its exception raised here."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, args, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def fail_requests(self, error: BaseException, queued_only: bool = False) -> None:
        """End requests with `error` (their streams raise it): those not started yet
        (`queued_only`), or every unfinished one. Applied on the engine thread."""
        self._submit(("fail", error, queued_only))

    @property
    def is_idle(self) -> bool:
        """No request is queued, running or being added (a benign cross-thread read)."""
        return self._pending_adds == 0 and not self.engine.has_unfinished_requests()

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------
    @staticmethod
    def _resolve(fut: concurrent.futures.Future, error: BaseException | None = None) -> None:
        """Complete a caller's future unless the caller already cancelled it."""
        if fut.done():
            return
        try:
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                self.engine.abort_request(cmd[1])
                continue
            if cmd[0] == "call":
                _, fn, args, done = cmd
                try:
                    result = fn(*args)
                except Exception as e:  # that caller's error only
                    self._resolve(done, e)
                else:
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        done.set_result(result)
                continue
            if cmd[0] == "fail":
                _, error, queued_only = cmd
                ids = (
                    self.engine.queued_request_ids()
                    if queued_only
                    else self.engine.unfinished_request_ids()
                )
                self.engine.abort_request(ids)
                for rid in ids:
                    self._deliver(rid, error)
                continue
            _, rid, prompt, ids, params, lora, fut = cmd
            try:
                if rid in self._streams and not fut.cancelled():
                    self.engine.add_request(
                        rid, prompt or "", params, prompt_token_ids=ids, lora_request=lora
                    )
                self._resolve(fut)  # (or the caller already went away)
            except Exception as e:  # bad input: report to that caller only
                self._resolve(fut, e)
            finally:
                with self._lock:
                    self._pending_adds -= num_sequences(params)

    def _deliver(self, rid: str, item: Any) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.push, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside a step: fail everyone at once, loudly
            logger.exception("the engine loop died; failing every request")
            self.dead = e
            self._fail_all(EngineDeadError(f"the engine stopped: {type(e).__name__}: {e}"))

    def _fail_all(self, error: BaseException) -> None:
        while True:  # waiters on add_request
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "call":
                self._resolve(cmd[-1], error)
            if cmd[0] == "add":
                self._resolve(cmd[-1], error)
                with self._lock:
                    self._pending_adds -= num_sequences(cmd[4])
        for rid in list(self._streams):
            self._deliver(rid, error)

    def _loop(self) -> None:
        engine = self.engine
        # Requests allocate and free many short-lived buffers from several threads (tokenizer
        # workers, the event loop, this one); glibc keeps freed pages in its arenas, so the
        # resident memory of a long-running server creeps up. Handing them back when the loop
        # goes idle, and every TRIM_INTERVAL_S while busy, keeps it flat.
        trim = _malloc_trim()
        last_trim = time.monotonic()
        while not self._stop.is_set():
            self._apply_commands()
            if trim is not None and time.monotonic() - last_trim > TRIM_INTERVAL_S:
                trim(0)
                last_trim = time.monotonic()
            if not engine.has_unfinished_requests():
                if trim is not None and last_trim < self._last_busy:
                    trim(0)
                    last_trim = time.monotonic()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._last_busy = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as e:  # a bug in a step: fail the requests in it, keep serving
                logger.exception("engine step failed; aborting the running requests")
                failed = engine.unfinished_request_ids()
                engine.abort_request(failed)
                for rid in failed:
                    self._deliver(rid, RuntimeError(f"internal engine error: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, ValueError(out.error) if out.error else out)
        # Shutdown: abort whatever is left so every stream ends.
        self._apply_commands()
        left = engine.unfinished_request_ids()
        engine.abort_request(left)
        for rid in left:
            self._deliver(rid, EngineDeadError("the server is shutting down"))
