"""data_plane.http1: heads and bodies read from a hand-fed StreamReader (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from data_plane.http1 import MAX_HEAD, BodyReader, Head, HttpError, check_framing, chunk_size, copy_body, read_head


def _reader(*parts: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    for p in parts:
        r.feed_data(p)
    if eof:
        r.feed_eof()
    return r


def _head(start: str, *headers: tuple[str, str]) -> Head:
    return Head(start.split(" ", 2), list(headers), b"")


async def _all(body: BodyReader) -> list[bytes]:
    out = []
    async with asyncio.timeout(5):
        while (chunk := await body.read()) is not None:
            out.append(chunk)
    return out


async def test_read_head_parses_a_request_and_leaves_the_body() -> None:
    raw = b"POST /p?q=1 HTTP/1.1\r\nHost: shop.test\r\nContent-Length:  4 \r\nX-Empty:\r\n\r\n"
    r = _reader(raw + b"body")
    head = await read_head(r)
    assert head is not None
    assert head.start == ["POST", "/p?q=1", "HTTP/1.1"]
    assert head.headers == [("Host", "shop.test"), ("Content-Length", "4"), ("X-Empty", "")]
    assert head.raw == raw
    assert head.get("content-length") == "4" and head.get("missing") is None
    assert not head.wants_close()
    assert await r.read() == b"body"


async def test_read_head_end_of_stream_and_errors() -> None:
    assert await read_head(_reader()) is None  # a clean EOF before any byte
    with pytest.raises(HttpError):
        await read_head(_reader(b"GET / HTTP/1.1\r\nHost: x\r\n"))  # closed mid-head
    with pytest.raises(HttpError):
        await read_head(_reader(b"GET\r\n\r\n"))
    with pytest.raises(HttpError):
        await read_head(_reader(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"))
    with pytest.raises(HttpError):
        await read_head(_reader(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"))  # whitespace before the colon
    big = asyncio.StreamReader(limit=1024)
    big.feed_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 4096 + b"\r\n\r\n")
    big.feed_eof()
    with pytest.raises(HttpError):
        await read_head(big)


async def test_read_head_response_and_close() -> None:
    head = await read_head(_reader(b"HTTP/1.0 200 OK\r\n\r\n"))
    assert head is not None and head.start == ["HTTP/1.0", "200", "OK"] and head.wants_close()
    head = await read_head(_reader(b"HTTP/1.1 204\r\nConnection: close\r\n\r\n"))
    assert head is not None and head.start == ["HTTP/1.1", "204", ""] and head.wants_close()


async def test_content_length_body_is_read_fully_across_several_reads() -> None:
    r = _reader(eof=False)
    body = BodyReader(_head("POST / HTTP/1.1", ("Content-Length", "11")), r, is_response=False)
    assert not body.empty and not body.done and not body.until_close

    async def feed() -> None:
        for part in (b"hel", b"lo ", b"wor", b"ld", b"NEXT"):  # the next message's bytes stay
            r.feed_data(part)
            await asyncio.sleep(0)

    feeder = asyncio.create_task(feed())
    chunks = await _all(body)
    await feeder
    assert b"".join(chunks) == b"hello world"
    assert len(chunks) > 1
    assert body.done
    assert await body.read() is None
    assert await r.readexactly(4) == b"NEXT"


async def test_a_zero_content_length_is_empty() -> None:
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Content-Length", "0")), _reader(b"x"), is_response=True)
    assert body.empty and body.done and await body.read() is None


async def test_bad_content_length() -> None:
    with pytest.raises(HttpError):
        BodyReader(_head("POST / HTTP/1.1", ("Content-Length", "-1")), _reader(), is_response=False)


async def test_chunked_with_extensions_and_trailers() -> None:
    r = _reader(b"5;ext=1;name=\"v\"\r\nhello\r\n", b"6 ; foo\r\n world\r\n", b"A\r\n0123456789\r\n",
                b"0;last\r\nGrpc-Status: 0\r\nX-Checksum:  abc \r\n\r\n", b"NEXT")
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Transfer-Encoding", "chunked"), ("Content-Length", "99")),
                      r, is_response=True)
    assert not body.empty and not body.done  # chunked wins over a Content-Length (RFC 9112 6.3)
    assert b"".join(await _all(body)) == b"hello world0123456789"
    assert body.done
    assert body.trailers == [(b"grpc-status", b"0"), (b"x-checksum", b"abc")]
    assert await r.read() == b"NEXT"


async def test_chunked_without_trailers_and_a_request() -> None:
    r = _reader(b"3\r\nabc\r\n0\r\n\r\n")
    body = BodyReader(_head("POST / HTTP/1.1", ("Transfer-Encoding", "gzip, chunked")), r, is_response=False)
    assert await _all(body) == [b"abc"]
    assert body.trailers == [] and body.done and not body.empty


@pytest.mark.parametrize("wire", [
    b"3\r\nabcX\r\n0\r\n\r\n",     # a chunk longer than its size
    b"3\r\nabc0\r\n\r\n",          # not followed by CRLF
])
async def test_a_chunk_not_followed_by_crlf_is_an_error(wire: bytes) -> None:
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Transfer-Encoding", "chunked")), _reader(wire), is_response=True)
    with pytest.raises(HttpError):
        await _all(body)


BAD_SIZES = [b"xyz", b"-5", b"+5", b"0x5", b"5_0", b"5 5", b" 5", b"", b"5\n"]


@pytest.mark.parametrize("size", BAD_SIZES)
async def test_a_bad_chunk_size_is_an_error(size: bytes) -> None:
    # Python's int(x, 16) takes "-5", "+5", "0x5", "5_0" and " 5"; an origin reads them otherwise (or
    # refuses them): the ZEN must not frame the body its own way. A negative size read to the end of
    # the connection, and an empty line ended the body.
    r = _reader(size + b"\r\nhello\r\n0\r\n\r\n")
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Transfer-Encoding", "chunked")), r, is_response=True)
    with pytest.raises(HttpError):
        await body.read()  # the very first read: no byte of it is taken as body


@pytest.mark.parametrize("line,size", [
    (b"0\r\n", 0), (b"00A\r\n", 10), (b"fF\r\n", 255), (b"5;a=b\r\n", 5), (b"5 ;a\r\n", 5), (b"5\t;a\r\n", 5)])
def test_chunk_size(line: bytes, size: int) -> None:
    assert chunk_size(line) == size


@pytest.mark.parametrize("wire", [
    b"5\r\nhe",               # closed in the middle of a chunk
    b"5\r\nhello",            # closed before the chunk's CRLF
    b"5\r\nhello\r\n",        # closed before the next size line
    b"5\r\nhello\r\n0\r\nX-T: 1\r\n",  # closed in the trailers
])
async def test_a_chunked_body_cut_short_by_the_connection_is_an_http_error(wire: bytes) -> None:
    # An HttpError (not asyncio.IncompleteReadError) is what the upstream pumps handle: they reset
    # the origin stream so the origin does not wait for the rest of a request that will never come.
    body = BodyReader(_head("POST / HTTP/1.1", ("Transfer-Encoding", "chunked")), _reader(wire), is_response=False)
    with pytest.raises(HttpError):
        await _all(body)


async def test_an_overlong_chunk_line_or_trailers_are_http_errors() -> None:
    long_line = asyncio.StreamReader(limit=1024)
    long_line.feed_data(b"5;" + b"x" * 4096 + b"\r\nhello\r\n0\r\n\r\n")
    long_line.feed_eof()
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Transfer-Encoding", "chunked")), long_line, is_response=True)
    with pytest.raises(HttpError):
        await _all(body)
    endless = b"0\r\n" + b"x-t: " + b"a" * 1000 + b"\r\n"
    r = _reader(endless + b"x-t: b\r\n" * (2 * MAX_HEAD // 8) + b"\r\n")
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Transfer-Encoding", "chunked")), r, is_response=True)
    with pytest.raises(HttpError):  # trailers are kept in memory: no more than a head's worth
        await _all(body)


class Sink:
    """A StreamWriter's write/drain, recording what was written."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.wrote = asyncio.Event()

    def write(self, b: bytes) -> None:
        self.data += b
        self.wrote.set()

    async def drain(self) -> None:
        pass


async def _copy(head: Head, r: asyncio.StreamReader, sink: Sink, *, is_response: bool) -> tuple[int, bool]:
    async with asyncio.timeout(5):
        return await copy_body(head, r, sink, is_response=is_response)  # type: ignore[arg-type]


async def test_copy_body_chunked_is_copied_as_is() -> None:
    wire = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\n\r\n"
    sink = Sink()
    r = _reader(wire + b"NEXT")
    assert await _copy(_head("POST / HTTP/1.1", ("Transfer-Encoding", "chunked")), r, sink, is_response=False) \
        == (11, False)
    assert bytes(sink.data) == wire
    assert await r.read() == b"NEXT"


@pytest.mark.parametrize("size", BAD_SIZES)
async def test_copy_body_refuses_a_bad_chunk_size_before_passing_it_on(size: bytes) -> None:
    sink = Sink()
    r = _reader(b"3\r\nabc\r\n" + size + b"\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(HttpError):
        await _copy(_head("POST / HTTP/1.1", ("Transfer-Encoding", "chunked")), r, sink, is_response=False)
    assert bytes(sink.data) == b"3\r\nabc\r\n"  # the origin never sees the line the ZEN could not read


async def test_copy_body_refuses_a_chunk_not_followed_by_crlf() -> None:
    sink = Sink()
    r = _reader(b"3\r\nabcXY0\r\n\r\n")
    with pytest.raises(HttpError):
        await _copy(_head("POST / HTTP/1.1", ("Transfer-Encoding", "chunked")), r, sink, is_response=False)


async def test_copy_body_relays_a_large_chunk_as_it_arrives() -> None:
    # "It never buffers a whole body": a chunk of 1 MB (or 1 GB) is not held whole before it goes on.
    sink = Sink()
    r = _reader(b"100000\r\n" + b"a" * 65536, eof=False)
    copy = asyncio.create_task(_copy(_head("POST / HTTP/1.1", ("Transfer-Encoding", "chunked")), r, sink,
                                     is_response=False))
    try:
        async with asyncio.timeout(5):
            while len(sink.data) < 65536:
                sink.wrote.clear()
                await sink.wrote.wait()
        r.feed_data(b"a" * (0x100000 - 65536) + b"\r\n0\r\n\r\n")
        r.feed_eof()
        assert await copy == (0x100000, False)
        assert bytes(sink.data) == b"100000\r\n" + b"a" * 0x100000 + b"\r\n0\r\n\r\n"
    finally:
        copy.cancel()


async def test_a_body_shorter_than_its_content_length_is_an_error() -> None:
    body = BodyReader(_head("HTTP/1.1 200 OK", ("Content-Length", "10")), _reader(b"only5"), is_response=True)
    assert await body.read() == b"only5"
    with pytest.raises(HttpError):
        await body.read()
    assert not body.done


async def test_a_response_without_length_is_read_until_close() -> None:
    r = _reader(b"part one, ", b"part two")
    body = BodyReader(_head("HTTP/1.1 200 OK"), r, is_response=True)
    assert body.until_close and not body.done and not body.empty
    assert b"".join(await _all(body)) == b"part one, part two"
    assert body.done


@pytest.mark.parametrize("status,method", [
    ("200", "HEAD"), ("204", "GET"), ("304", "GET"), ("100", "POST"), ("103", "GET"), ("101", "GET")])
async def test_responses_that_have_no_body(status: str, method: str) -> None:
    head = _head(f"HTTP/1.1 {status} X", ("Content-Length", "5"), ("Transfer-Encoding", "chunked"))
    r = _reader(b"hello")
    body = BodyReader(head, r, is_response=True, request_method=method)
    assert body.empty and body.done and not body.until_close
    assert await body.read() is None
    assert await r.read() == b"hello"  # nothing consumed


async def test_a_request_without_length_has_no_body() -> None:
    r = _reader(b"GET /next HTTP/1.1\r\n\r\n")
    body = BodyReader(_head("GET / HTTP/1.1", ("Host", "x")), r, is_response=False)
    assert body.empty and body.done and not body.until_close
    assert await body.read() is None
    assert (await read_head(r)) is not None  # the next request is still there


@pytest.mark.parametrize("headers, request_, why", [
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], True, "both"),
    ([("Transfer-Encoding", "chunked, gzip")], True, "last transfer coding"),
    ([("Content-Length", "5"), ("Content-Length", "6")], True, "one number"),
    ([("Content-Length", "+5")], True, "one number"),
])
def test_framing_two_parsers_could_read_differently_is_refused(
        headers: list[tuple[str, str]], request_: bool, why: str) -> None:
    with pytest.raises(HttpError, match=why):
        check_framing(Head(["POST", "/", "HTTP/1.1"], headers, b""), is_request=request_)


@pytest.mark.parametrize("headers", [[], [("Content-Length", "5")], [("Content-Length", "5"), ("content-length", "5")],
                                     [("Transfer-Encoding", "gzip, chunked")]])
def test_framing_that_can_only_be_read_one_way_passes(headers: list[tuple[str, str]]) -> None:
    check_framing(Head(["POST", "/", "HTTP/1.1"], headers, b""), is_request=True)


def test_a_deadline_times_out_each_head_and_nothing_else() -> None:
    """http1.Deadline: one timer per connection, each wait for a head limited as asyncio.timeout
    limits it; the time between heads (a body being copied) is not limited; another
    cancellation stays a cancellation."""
    import asyncio

    from data_plane.http1 import Deadline, read_head

    async def main() -> None:
        reader = asyncio.StreamReader()
        deadline = Deadline()
        reader.feed_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_head(reader, 0.2, deadline)
        assert head is not None and head.start[1] == "/a"
        await asyncio.sleep(0.3)  # not waiting for a head: no limit
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, reader.feed_data, b"GET /b HTTP/1.1\r\n\r\n")
        head = await read_head(reader, 0.2, deadline)  # in time, though the first deadline has passed
        assert head is not None and head.start[1] == "/b"
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await read_head(reader, 0.2, deadline)
        assert 0.15 < loop.time() - t0 < 1.0
        deadline.close()

        async def cancelled() -> None:
            d = Deadline()
            await read_head(asyncio.StreamReader(), 5, d)
        t = asyncio.create_task(cancelled())
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    asyncio.run(main())
