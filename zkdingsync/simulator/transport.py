"""How a fake terminal talks on the network: TCP and UDP on one port, sessions, live events.

Each reply packet is written on its own and flushed before the next, with a short pause between the
packets of one reply, so that each arrives in its own TCP segment as it does from a terminal's embedded
stack (some clients parse one packet per segment). Live events go one per packet, the next only after
the client acknowledged the previous one (or after `EVENT_ACK_TIMEOUT_SECONDS`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import structlog

from zkdingsync.simulator import protocol as p
from zkdingsync.simulator.dispatch import Dispatcher, Session
from zkdingsync.simulator.faults import FaultKind
from zkdingsync.simulator.state import TerminalData

log = structlog.get_logger(__name__)

EVENT_ACK_TIMEOUT_SECONDS = 1.0
UDP_SESSION_IDLE_SECONDS = 300.0
MAX_TCP_PACKET = 1 << 20
PACKET_GAP_SECONDS = 0.004  # between the packets of one reply: each leaves in a segment of its own
EAGER_GAP_SECONDS = 0.02  # between any two packets to a client that does not wait for replies (_keep_apart)


class Transport:
    """Serves one terminal's port (event loop thread only, except `run_in_loop`)."""

    def __init__(self, data: TerminalData, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.data = data
        self.dispatcher = Dispatcher(data)
        self.loop = loop
        self.host = host
        self.port = port
        self.sessions: set[Session] = set()
        self._udp_sessions: dict[tuple[str, int], Session] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def run_in_loop(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop (now, when called from it)."""
        if self.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            callback()
        else:
            self.loop.call_soon_threadsafe(callback)

    # -------------------------------------------------------------------------------- live events

    def broadcast(self, stored: list[bytes]) -> None:
        """Queue a live event for each registered session (loop thread)."""
        targets = [s for s in self.sessions if s.registered]
        if not targets:
            return
        payloads = [self.dispatcher.event_payload(data) for data in stored]
        for session in targets:
            for payload in payloads:
                session.events.append(p.build_packet(p.CMD_REG_EVENT, p.EVENT_ATTENDANCE, 0, payload))
            self._pump_events(session)

    def _pump_events(self, session: Session) -> None:
        """Send the next queued event unless one is waiting for its acknowledgement."""
        if session.awaiting_ack is not None or session.replying or not session.events:
            return
        if not session.registered:
            session.events.clear()
            return
        session.send(session.events.popleft())

        def timed_out() -> None:
            session.awaiting_ack = None
            self._pump_events(session)

        session.awaiting_ack = self.loop.call_later(EVENT_ACK_TIMEOUT_SECONDS, timed_out)

    def _event_acknowledged(self, session: Session) -> None:
        if session.awaiting_ack is not None:
            session.awaiting_ack.cancel()
            session.awaiting_ack = None
        self._pump_events(session)

    # ------------------------------------------------------------------------------------ protocol

    # ---------------------------------------------------------------------------------- listening

    async def start_listening(self) -> None:
        """Bind TCP and UDP on the same port (a free one when the spec says 0) and serve (loop thread)."""
        last_error: OSError | None = None
        for _attempt in range(50):
            server = await asyncio.start_server(
                self._serve_tcp, self.host, self.port, reuse_address=True, backlog=128
            )
            port = server.sockets[0].getsockname()[1]
            try:
                transport, _ = await self.loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, port)
                )
            except OSError as error:  # the UDP side of a free TCP port can be taken: try another port
                server.close()
                last_error = error
                if self.port:
                    raise
                continue
            self.port = port
            self._servers = [server]
            self._udp_transport = transport
            return
        raise OSError(f"no port free for both TCP and UDP: {last_error}")

    async def stop_listening(self) -> None:
        """Close the servers and every session (loop thread)."""
        for server in self._servers:
            server.close()
        self._servers = []
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        self.drop_sessions()

    async def close(self) -> None:
        """Stop listening, drop every connection, cancel tasks (loop thread)."""
        await self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def drop_sessions(self) -> None:
        """Close every TCP connection and forget every session (loop thread)."""
        for writer in list(self._tcp_writers):
            writer.close()
        self._tcp_writers.clear()
        for session in list(self.sessions):
            if session.awaiting_ack is not None:
                session.awaiting_ack.cancel()
            session.registered = False
        self.sessions.clear()
        self._udp_sessions.clear()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: read framed requests, answer each in order."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without it every chunk of a buffered read waits ~45 ms on Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # drain() then waits until every byte written has gone to the kernel: one packet per segment.
        writer.transport.set_write_buffer_limits(high=0)
        if self.data.take_fault(FaultKind.REFUSE, None) is not None:
            writer.close()
            if task is not None:
                self._tasks.discard(task)
            return
        self._tcp_writers.add(writer)

        def send(packet: bytes) -> None:
            if not writer.is_closing():
                writer.write(p.tcp_frame(packet))

        session = Session(send=send, udp=False)
        self.sessions.add(session)
        requests: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        receiving = self.loop.create_task(self._receive_tcp(reader, requests))
        try:
            while (request := await requests.get()) is not None:
                arrived, packet = request
                # Asked before the previous reply was all sent: this client does not wait for replies.
                session.eager = session.eager or arrived < session.last_sent
                if not await self._serve_request(session, packet, writer):
                    break
                await writer.drain()
        except ConnectionError:
            pass  # the client went away (pyzk's probe connection does this on purpose)
        except asyncio.CancelledError:
            # The terminal is closing. This is the task's top frame: ending quietly keeps asyncio's
            # stream callback (which calls task.exception()) from logging a spurious traceback.
            pass
        finally:
            receiving.cancel()
            self._end_session(session)
            self._tcp_writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _receive_tcp(
        self, reader: asyncio.StreamReader, requests: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        """Read framed requests as they come, each with its arrival time; None when the stream ends."""
        try:
            while True:
                prefix = await reader.readexactly(p.TCP_PREFIX.size)
                magic, length = p.TCP_PREFIX.unpack(prefix)
                if magic != p.TCP_MAGIC or not p.HEADER.size <= length <= MAX_TCP_PACKET:
                    log.debug("simulator.bad_frame", serial=self.data.serial, port=self.port)
                    break
                packet = await reader.readexactly(length)
                requests.put_nowait((time.monotonic(), packet))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            requests.put_nowait(None)

    def _end_session(self, session: Session) -> None:
        if session.awaiting_ack is not None:
            session.awaiting_ack.cancel()
            session.awaiting_ack = None
        session.registered = False
        self.sessions.discard(session)

    async def _serve_request(
        self, session: Session, packet: bytes, writer: asyncio.StreamWriter | None
    ) -> bool:
        """Answer one request, applying faults. Returns False when the conversation is over."""
        command, _check, _session_id, reply_id, payload = p.parse_header(packet)
        session.last_seen = time.monotonic()
        if command == p.CMD_ACK_OK:
            self._event_acknowledged(session)  # a client acknowledging a live event: never answered
            return True
        delay = self.data.take_fault(FaultKind.DELAY, command)
        if delay is not None:
            await asyncio.sleep(delay.seconds)
        reply = self.dispatcher.handle(session, command, reply_id, payload)
        packets = reply.packets
        garbage = self.data.take_fault(FaultKind.GARBAGE, command)
        if garbage is not None:
            packets = self.dispatcher.garbage(packets, garbage.raw, command)
        if command == p.CMD_READ_BUFFER and len(packets) > 2:
            drop = self.data.take_fault(FaultKind.DROP_MID_DOWNLOAD, command)
            if drop is not None:
                _send_partial(session, packets, drop.after_bytes, writer)
                self._end_session(session)
                return False
        session.replying = True
        try:
            for index, out in enumerate(packets):
                if writer is not None:
                    await _keep_apart(session, writer, first=index == 0)
                session.send(out)
        finally:
            session.replying = False
        self._pump_events(session)
        if reply.close_after:
            self._end_session(session)
            return False
        return True

    # UDP --------------------------------------------------------------------------------------

    def _udp_datagram(
        self, data: bytes, address: tuple[str, int], transport: asyncio.DatagramTransport
    ) -> None:
        if self.data.take_fault(FaultKind.REFUSE, None) is not None:
            return
        now = time.monotonic()
        session = self._udp_sessions.get(address)
        if session is None:
            self._expire_udp_sessions(now)

            def send(packet: bytes) -> None:
                if not transport.is_closing():
                    transport.sendto(packet, address)

            session = Session(send=send, udp=True, last_seen=now, inbox=asyncio.Queue())
            self._udp_sessions[address] = session
            self.sessions.add(session)
            task = self.loop.create_task(self._serve_udp(session, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if session.inbox is not None:
            session.inbox.put_nowait(data)

    async def _serve_udp(self, session: Session, address: tuple[str, int]) -> None:
        """One UDP peer: answer its datagrams in order (a delay fault must hold back later ones too)."""
        inbox = session.inbox
        if inbox is None:
            return
        try:
            while self._udp_sessions.get(address) is session:
                try:
                    packet = await asyncio.wait_for(inbox.get(), timeout=UDP_SESSION_IDLE_SECONDS)
                except asyncio.TimeoutError:
                    break
                try:
                    keep = await self._serve_request(session, packet, None)
                except ValueError:
                    continue  # shorter than a header: ignore, as a terminal would
                if not keep:
                    break
        finally:
            if self._udp_sessions.get(address) is session:
                del self._udp_sessions[address]
            self._end_session(session)

    def _expire_udp_sessions(self, now: float) -> None:
        for address, session in list(self._udp_sessions.items()):
            if now - session.last_seen > UDP_SESSION_IDLE_SECONDS:
                del self._udp_sessions[address]
                self._end_session(session)


async def _keep_apart(session: Session, writer: asyncio.StreamWriter, *, first: bool) -> None:
    """Wait until the previous packet has left and a pause has passed since it, so the next one is
    a segment (and, for the client, a receive) of its own: `PACKET_GAP_SECONDS` between the packets
    of one reply, none between replies; but `EAGER_GAP_SECONDS` between any two packets to an eager
    client (one that asks before the previous reply is complete, as zkteco-js does after a buffered
    read: two packets in one receive lose it the second, and a busy client reads them late)."""
    await writer.drain()
    gap = EAGER_GAP_SECONDS if session.eager else 0.0 if first else PACKET_GAP_SECONDS
    wait = session.last_sent + gap - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    session.last_sent = time.monotonic()


def _send_partial(
    session: Session, packets: list[bytes], after_bytes: int, writer: asyncio.StreamWriter | None
) -> None:
    """Send PREPARE_DATA and `after_bytes` bytes of the chunk, then stop (the drop fault); the caller
    ends the session."""
    session.send(packets[0])
    if writer is not None:
        data = b"".join(p.tcp_frame(packet) for packet in packets[1:-1])
        writer.write(data[: p.TCP_PREFIX.size + p.HEADER.size + max(0, after_bytes)])
        writer.close()
    else:
        sent = 0
        for packet in packets[1:-1]:
            if sent >= after_bytes:
                break
            session.send(packet)
            sent += len(packet) - p.HEADER.size


class _UdpProtocol(asyncio.DatagramProtocol):
    """Hands every datagram to the terminal (loop thread)."""

    def __init__(self, terminal: Transport) -> None:
        self.terminal = terminal
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.terminal._udp_datagram(data, addr, self.transport)
