"""RemoteBytes' read-ahead over a stand-in object (no server): the streams of a tensor's inputs,
opened one after the other and read in step, each keep fetching ahead through the pool."""

import threading

import torch

from ckptavg.formats import remote_files
from ckptavg.formats.remote_files import RangeReader, RemoteBytes

BLOCK = 2**12


class Source:
    """An object's bytes, recording the threads its ranges are read on."""

    def __init__(self, data: bytes):
        self.data, self.threads = data, []

    def read_range(self, begin: int, end: int):
        self.threads.append(threading.current_thread().name)
        return torch.frombuffer(bytearray(self.data[begin:end]), dtype=torch.uint8)


def read_in_step(read_ahead: int, count: int = 4, blocks: int = 16):
    sources = [Source(bytes(range(256)) * (blocks * BLOCK // 256)) for _ in range(count)]
    with RangeReader(read_ahead, requests=4) as reader:
        streams = [RemoteBytes(s, reader, 0, len(s.data), torch.uint8) for s in sources]
        for start in range(0, blocks * BLOCK, BLOCK // 2):
            for source, stream in zip(sources, streams, strict=True):
                window = slice(start, start + BLOCK // 2)
                assert bytes(stream[window].tolist()) == source.data[window]
    return sources


def test_every_stream_reads_through_the_pool(monkeypatch):
    monkeypatch.setattr(remote_files, "REMOTE_BLOCK_BYTES", BLOCK)
    for read_ahead in (8 * BLOCK, BLOCK // 2):  # a share of several blocks each; less than one block
        for source in read_in_step(read_ahead):
            assert len(source.threads) == 16  # each block once
            assert all(name.startswith("ckptavg-range") for name in source.threads)


def test_read_ahead_shared_by_streams_opened_in_turn(monkeypatch):
    monkeypatch.setattr(remote_files, "REMOTE_BLOCK_BYTES", BLOCK)
    with RangeReader(8 * BLOCK, requests=4) as reader:
        sources = [Source(bytes(16 * BLOCK)) for _ in range(4)]
        streams = [RemoteBytes(s, reader, 0, len(s.data), torch.uint8) for s in sources]
        for stream in streams:
            stream[0:1]
        assert [stream._ahead for stream in streams] == [2 * BLOCK] * 4  # a fair share each
