"""SPDY/3.1 framing against frames written out byte by byte from the draft."""

from __future__ import annotations

import struct
import zlib

import pytest

from services.frontend.streaming import spdy_frames as f
from tests.frontend.streaming.spdy_client import SPDY3_DICTIONARY


def test_dictionary_matches_the_draft():
    assert len(f.DICTIONARY) == 1423
    assert zlib.adler32(f.DICTIONARY) == 0xE3C6A7C2
    assert f.DICTIONARY == SPDY3_DICTIONARY


# Frames as they travel, from the draft's layouts.
PING_7 = bytes.fromhex("80030006 00000004 00000007")
RST_5_CANCEL = bytes.fromhex("80030003 00000008 00000005 00000005")
WINDOW_UPDATE_1 = bytes.fromhex("80030009 00000008 00000001 00010000")
SETTINGS_WINDOW = bytes.fromhex("80030004 0000000c 00000001 00000007 00010000")
GOAWAY_5 = bytes.fromhex("80030007 00000008 00000005 00000000")
DATA_FIN_HELLO = bytes.fromhex("00000001 01000005") + b"hello"


def _stored_header_block(pairs: list[tuple[str, str]]) -> bytes:
    """A header block compressed as a zlib 'stored' block primed with the SPDY dictionary id."""
    raw = struct.pack(">I", len(pairs))
    for k, v in pairs:
        raw += struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode()
    # zlib header: CM=8 CINFO=7, FDICT set, FCHECK making it a multiple of 31; then the dictionary id.
    head = bytes([0x78, 0x20]) + struct.pack(">I", 0xE3C6A7C2)
    block = bytes([0x00]) + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw
    return head + block


def test_decodes_control_frames():
    frames = f.FrameDecoder().feed(PING_7 + RST_5_CANCEL + WINDOW_UPDATE_1 + SETTINGS_WINDOW + GOAWAY_5)
    ping, rst, window, settings, goaway = frames
    assert (ping.type, ping.ping_id) == (f.PING, 7)
    assert (rst.type, rst.stream_id, rst.status) == (f.RST_STREAM, 5, f.CANCEL)
    assert (window.type, window.stream_id, window.delta) == (f.WINDOW_UPDATE, 1, 65536)
    assert settings.settings == {f.SETTINGS_INITIAL_WINDOW_SIZE: 65536}
    assert (goaway.type, goaway.last_good_id) == (f.GOAWAY, 5)


def test_encodes_control_frames_byte_for_byte():
    assert f.encode_ping(7) == PING_7
    assert f.encode_rst_stream(5, f.CANCEL) == RST_5_CANCEL
    assert f.encode_window_update(1, 65536) == WINDOW_UPDATE_1
    assert f.encode_settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 65536}) == SETTINGS_WINDOW
    assert f.encode_goaway(5) == GOAWAY_5
    assert f.encode_data(1, b"hello", f.FLAG_FIN) == DATA_FIN_HELLO


def test_decodes_a_recorded_syn_stream_split_anywhere():
    block = _stored_header_block([("streamtype", "data"), ("port", "8080"), ("requestid", "0")])
    body = struct.pack(">IIBB", 3, 0, 0, 0) + block
    frame = bytes.fromhex("80030001") + struct.pack(">I", len(body)) + body + DATA_FIN_HELLO.replace(
        b"\x00\x00\x00\x01", b"\x00\x00\x00\x03", 1)
    for cut in range(1, len(frame)):
        decoder = f.FrameDecoder()
        got = decoder.feed(frame[:cut]) + decoder.feed(frame[cut:])
        syn, data = got
        assert syn.type == f.SYN_STREAM and syn.stream_id == 3
        assert syn.headers == {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]}
        assert data.stream_id == 3 and data.data == b"hello" and data.fin


def test_header_context_spans_frames_both_ways():
    # The test client's compressor (its own zlib context) feeding the server's decoder.
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)
    decoder = f.FrameDecoder()
    for sid, kind in ((1, "error"), (3, "stdout"), (5, "stderr")):
        raw = struct.pack(">I", 1) + struct.pack(">I", 10) + b"streamtype" + struct.pack(">I", len(kind)) + \
            kind.encode()
        block = deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)
        body = struct.pack(">IIBB", sid, 0, 0, 0) + block
        (syn,) = decoder.feed(bytes.fromhex("80030001") + struct.pack(">I", len(body)) + body)
        assert syn.headers == {"streamtype": [kind]}
    # And the server's compressor read back by an independent inflater.
    compressor = f.HeaderCompressor()
    inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
    for sid in (1, 3):
        frame = f.encode_syn_reply(compressor, sid, {"x-a": ["1", "2"]})
        assert frame[:4] == bytes.fromhex("80030002")
        raw = inflate.decompress(frame[12:])
        assert raw == struct.pack(">I", 1) + struct.pack(">I", 3) + b"x-a" + struct.pack(">I", 3) + b"1\x002"


def test_rejects_wrong_version_and_oversized_frames():
    with pytest.raises(f.ProtocolError):
        f.FrameDecoder().feed(bytes.fromhex("80020006 00000004 00000007"))
    with pytest.raises(f.ProtocolError):
        f.FrameDecoder(max_length=1024).feed(bytes.fromhex("00000001 00100000"))


def test_rejects_a_header_bomb():
    raw = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 4_000_000) + b"b" * 4_000_000
    z = zlib.compressobj(zdict=f.DICTIONARY)
    block = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
    body = struct.pack(">IIBB", 1, 0, 0, 0) + block
    with pytest.raises(f.ProtocolError):
        f.FrameDecoder().feed(bytes.fromhex("80030001") + struct.pack(">I", len(body)) + body)


def test_ignores_unknown_control_frames():
    unknown = bytes.fromhex("8003000a 00000004 00000000")
    assert f.FrameDecoder().feed(unknown + PING_7)[0].ping_id == 7
