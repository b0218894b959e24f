"""URL inputs and outputs when the storage misbehaves, through a fault-injecting proxy
(`fault_proxy.py`) in front of moto's S3 server and of a local HTTP server that honours Range:
throttling and resets retried (reads and uploads), a dead or silent server reported in one line in
bounded time (an upload aborted), an object replaced mid-run refused with nothing written, a slow
server read slowly, Ctrl-C on one."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from click.testing import CliRunner
from conftest import perturbed_states
from s3_server import free_port, s3_server
from safetensors.torch import save

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import InputError
from ckptavg.inputs import remote
from ckptavg.options import OutputOptions, ReadOptions

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from inputs import test_remote
from inputs.fault_proxy import Fault, FaultProxy

small_blocks = test_remote.small_blocks


def waits(seconds: float) -> dict:
    """Storage options that wait `seconds` to connect and for an answer's next bytes (the defaults
    wait 10 s and 20 s a try), by protocol."""
    return {
        "s3": {"config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds}},
        "http": {"client_kwargs": {"timeout": {"sock_connect": seconds, "sock_read": seconds}}},
    }


QUICK = waits(1)  # a silent server given up on within seconds
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; yields (fs, storage options)."""
    with s3_server() as found:
        yield found


def tensor_ranges(method, path, headers) -> bool:
    """A tensor's block: a range past the header's (which starts at 0)."""
    return method == "GET" and not headers.get("range", "bytes=0-").startswith("bytes=0-")


@pytest.fixture
def proxied_s3(s3):
    """(fs straight to moto, storage options through the proxy, the proxy)."""
    fs, options = s3
    with FaultProxy(urlsplit(options["client_kwargs"]["endpoint_url"]).port) as proxy:
        yield fs, {**options, "client_kwargs": {"endpoint_url": proxy.url}}, proxy


@pytest.fixture
def proxied_http(tmp_path):
    """(the folder a Range server serves, the proxy in front of it)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(test_remote.RangeHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with FaultProxy(server.server_address[1]) as proxy:
        yield served, proxy
    server.shutdown()
    server.server_close()


def s3_inputs(fs, prefix, states):
    test_remote.upload(fs, prefix, states)
    return [f"s3://runs/{prefix}/step_*/"]


def http_inputs(served, proxy, states):
    for step, state in zip((1, 2, 10), states, strict=False):
        (served / f"step_{step}.safetensors").write_bytes(save(state, metadata={"format": "pt"}))
    return [f"{proxy.url}/step_{step}.safetensors" for step in (1, 2, 10)[: len(states)]]


def proxied_inputs(request, protocol, prefix, states):
    """`states` as inputs behind the proxy, on S3 or HTTP: (specs, storage options, proxy)."""
    if protocol == "s3":
        fs, options, proxy = request.getfixturevalue("proxied_s3")
        return s3_inputs(fs, prefix, states), options, proxy
    served, proxy = request.getfixturevalue("proxied_http")
    return http_inputs(served, proxy, states), {}, proxy


def average(specs, options, out, **read):
    return test_remote.remote_average(specs, options, out, ckptavg.swa(), **read)[1]


def cli(specs, options, out, *extra):
    started = time.monotonic()
    args = ["swa", *specs, "-o", str(out), "--storage-options", json.dumps(options), *extra]
    result = CliRunner().invoke(main, args)
    return result, time.monotonic() - started


def one_line_error(result) -> str:
    """The run's one error line, its last (after the plan, when the failure came once it was shown)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    return lines[-1]


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_s3_throttling_and_resets_are_retried(proxied_s3, tmp_path, small_blocks, kind):
    fs, options, proxy = proxied_s3
    states = test_remote.big_states(3)
    specs = s3_inputs(fs, f"flaky-{kind}", states)
    proxy.inject(Fault(kind, every=3, once=True))  # listing, descriptions and ranges alike
    averaged = average(specs, options, tmp_path / "out.safetensors", read_ahead="64KB")
    assert test_remote.same(averaged, test_remote.local_average(tmp_path, states, ckptavg.swa()))
    assert sum(1 for *_, byte_range in proxy.log.faults if byte_range) >= 3  # ranges among them


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_http_throttling_and_resets_are_retried(proxied_http, tmp_path, small_blocks, kind):
    served, proxy = proxied_http
    states = test_remote.big_states(3)
    specs = http_inputs(served, proxy, states)
    # Every other GET (the headers' ranges and the tensors'), once each: fsspec's HTTP file system
    # tries each only once, ckptavg tries it again.
    proxy.inject(Fault(kind, every=2, once=True, matches=lambda method, path, headers: method == "GET"))
    averaged = average(specs, {}, tmp_path / "out.safetensors", read_ahead="64KB")
    assert test_remote.same(averaged, test_remote.local_average(tmp_path, states, ckptavg.swa()))
    assert len(proxy.log.faults) >= 5


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_nothing_listening_is_one_line_soon(tmp_path, protocol):
    port = free_port()
    if protocol == "s3":
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        url = "s3://runs/gone/model.safetensors"
    else:
        options, url = {}, f"http://127.0.0.1:{port}/model.safetensors"
    result, elapsed = cli([url], options, tmp_path / "out.safetensors")
    line = one_line_error(result)
    assert line.startswith(f"error: {url}: cannot be read"), line
    assert elapsed < 60
    assert not (tmp_path / "out.safetensors").exists()


def test_http_missing_and_unavailable_told_apart(proxied_http, tmp_path):
    _, proxy = proxied_http
    url = f"{proxy.url}/none.safetensors"
    line = one_line_error(cli([url], {}, tmp_path / "out.safetensors")[0])
    assert line == f"error: {url}: no such object (or bucket)"
    proxy.inject(Fault("503"))  # fsspec says FileNotFoundError for this too
    line = one_line_error(cli([url], {}, tmp_path / "out.safetensors")[0])
    assert line.startswith(f"error: {url}: cannot be read after 3 tries (503"), line


def test_http_503_when_a_url_is_first_described_is_tried_again(proxied_http, tmp_path):
    served, proxy = proxied_http
    (served / "one.safetensors").write_bytes(save(perturbed_states(1)[0]))
    proxy.inject(Fault("503", once=True, matches=lambda method, path, headers: method == "HEAD"))
    result, _ = cli([f"{proxy.url}/one.safetensors"], {}, tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    assert proxy.log.faults and (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_a_server_that_stops_answering_names_the_byte_range(request, tmp_path, small_blocks, protocol):
    specs, options, proxy = proxied_inputs(request, protocol, "silent", test_remote.big_states(2))
    proxy.inject(Fault("hang", matches=tensor_ranges))  # the headers read, then silence
    result, elapsed = cli(specs, {**options, **QUICK[protocol]}, tmp_path / "out.safetensors")
    line = one_line_error(result)
    assert "/step_" in line and ".safetensors: reading bytes " in line, line
    first, last = (int(n) for n in line.split("reading bytes ")[1].split(" ")[0].split("-"))
    assert first > 0 and last >= first
    assert any(byte_range == f"bytes={first}-{last}" for _, _, _, byte_range in proxy.log.faults)
    assert elapsed < 60
    assert not (tmp_path / "out.safetensors").exists()


def local_checkpoints(tmp_path, count=3):
    """Local inputs whose average (12 MB) is uploaded in two parts."""
    paths = []
    for i, state in enumerate(perturbed_states(count)):
        state["big"] = torch.linspace(0, 1, 3_000_000) * (i + 1)
        paths.append(tmp_path / f"step_{i + 1}.safetensors")
        paths[-1].write_bytes(save(state))
    return paths


def upload_requests(method, path, headers) -> bool:
    """A multipart upload's start, parts and completion."""
    return method in ("PUT", "POST") and ("uploadId=" in path or path.endswith("?uploads"))


def test_an_upload_through_throttling_and_resets(proxied_s3, tmp_path):
    fs, options, proxy = proxied_s3
    paths = local_checkpoints(tmp_path)
    ckptavg.average(paths, ckptavg.swa(), tmp_path / "local.safetensors")
    for kind, key in (
        ("503", "runs/throttled-out/avg.safetensors"),
        ("reset", "runs/reset-out/avg.safetensors"),
    ):
        proxy.inject(Fault(kind, every=2, once=True, matches=upload_requests))
        ckptavg.average_many(
            paths,
            [ckptavg.swa()],
            read=ReadOptions(storage_options=options),
            output=OutputOptions(output=f"s3://{key}"),
        )
        assert fs.cat_file(key) == (tmp_path / "local.safetensors").read_bytes()
    assert {kind for kind, *_ in proxy.log.faults} == {"503", "reset"}
    assert not fs.list_multipart_uploads("runs")


def test_an_upload_to_a_silent_server_is_one_line_and_aborted(proxied_s3, tmp_path):
    fs, options, proxy = proxied_s3
    proxy.inject(Fault("hang", matches=lambda method, path, headers: "partNumber=" in path))
    url = "s3://runs/silent-out/avg.safetensors"
    result, elapsed = cli(map(str, local_checkpoints(tmp_path)), {**options, **QUICK["s3"]}, url)
    line = one_line_error(result)
    assert line.startswith(f"error: {url}: cannot upload"), line
    assert elapsed < 60
    assert proxy.log.faults
    assert not fs.exists("runs/silent-out/avg.safetensors")
    assert not fs.list_multipart_uploads("runs")  # the abort was answered


def test_an_input_replaced_during_an_upload_leaves_no_object(proxied_s3, tmp_path):
    fs, options, proxy = proxied_s3
    states = perturbed_states(3)
    for i, state in enumerate(states):
        state["big"] = torch.linspace(0, 1, 3_000_000) * (i + 1)  # 12 MB: an output of two parts
    specs = s3_inputs(fs, "replaced", states)
    replaced = []

    def replace_once(method, path):
        if "partNumber=" in path and not replaced:  # the output's first part is going up
            replaced.append(path)
            fs.pipe("runs/replaced/step_2/model.safetensors", save(states[0]))

    proxy.on_request = replace_once
    with pytest.raises(InputError, match=r"^s3://runs/replaced/step_2/model.safetensors: changed while"):
        ckptavg.average_many(
            specs,
            [ckptavg.swa()],
            read=ReadOptions(storage_options=options, read_ahead="8MB", remote_requests=2),
            output=OutputOptions(output="s3://runs/replaced-out/avg.safetensors"),
        )
    assert replaced
    assert not fs.exists("runs/replaced-out/avg.safetensors")
    assert not fs.list_multipart_uploads("runs")


def test_an_http_object_replaced_by_one_of_the_same_size_is_refused(proxied_http, tmp_path, small_blocks):
    served, proxy = proxied_http
    states = test_remote.big_states(2)
    specs = http_inputs(served, proxy, states)
    replaced = []

    def replace_once(method, path):
        if path == "/step_2.safetensors" and method == "GET" and not replaced:
            replaced.append(path)
            target = served / "step_2.safetensors"
            modified = target.stat().st_mtime
            target.write_bytes(save(states[0], metadata={"format": "pt"}))  # the same size, a later upload
            os.utime(target, (modified + 10, modified + 10))

    proxy.on_request = replace_once
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"/step_2.safetensors: changed while being read"):
        average(specs, {}, out, read_ahead="64KB")
    assert replaced
    assert not out.exists()


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_a_slow_server_is_read_slowly(request, tmp_path, small_blocks, protocol):
    states = test_remote.big_states(2)
    specs, options, proxy = proxied_inputs(request, protocol, "slow", states)
    # A few bytes every 10 ms: never silent for the 3 s a read may wait, however long it takes.
    proxy.inject(Fault("trickle", matches=tensor_ranges, chunk=2048, pause=0.01))
    averaged = average(specs, {**options, **waits(3)[protocol]}, tmp_path / "out.safetensors")
    assert test_remote.same(averaged, test_remote.local_average(tmp_path, states, ckptavg.swa()))
    assert proxy.log.trickled >= 2 * 200_000  # both inputs' `big`, trickled


def test_ctrl_c_on_a_slow_server_exits_soon_leaving_no_object_and_no_upload(proxied_s3, tmp_path):
    fs, options, proxy = proxied_s3
    states = perturbed_states(3)
    for i, state in enumerate(states):
        state["big"] = torch.linspace(0, 1, 3_000_000) * (i + 1)  # 12 MB: a part is uploaded
        state["zz"] = torch.linspace(0, 1, 1_000_000) * (i + 1)  # then this one, read slowly
    specs = s3_inputs(fs, "ctrl-c", states)
    data = save(states[0], metadata={"format": "pt"})
    header = 8 + int.from_bytes(data[:8], "little")
    slow_from = header + json.loads(data[8:header])["zz"]["data_offsets"][0]

    def zz_ranges(method, path, headers) -> bool:
        wanted = headers.get("range", "bytes=0-")
        return method == "GET" and int(wanted.removeprefix("bytes=").split("-")[0]) >= slow_from

    proxy.inject(Fault("trickle", matches=zz_ranges, chunk=1024, pause=0.05))
    args = ["-o", "s3://runs/ctrl-c-out/avg.safetensors", "--storage-options", json.dumps(options)]
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptavg", "swa", *specs, *args, "--device", "cpu"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (uploading(proxy) and proxy.log.trickled >= 20_000) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert uploading(proxy), "no part of the output was uploaded"
        trickled = proxy.log.trickled
        time.sleep(1)
        assert proxy.log.trickled > trickled, "the slow reads made no progress"
        assert child.poll() is None  # still reading
        child.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, err = child.communicate(timeout=60)
        elapsed = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert elapsed < 10, elapsed
    assert "Traceback" not in err and "interrupted: nothing was written" in err
    assert not fs.exists("runs/ctrl-c-out/avg.safetensors")
    assert not fs.list_multipart_uploads("runs")


def uploading(proxy) -> bool:
    return any("partNumber=" in path for _, path, _ in proxy.log.requests)


def test_waits_are_bounded_unless_the_options_set_their_own():
    fs, _ = remote.filesystem("s3://runs/a.safetensors", {"key": "k", "secret": "s"})
    assert fs.config_kwargs["read_timeout"] == remote.READ_TIMEOUT
    assert fs.config_kwargs["retries"] == remote.S3_RETRIES and fs.retries == 1
    own = {"key": "k", "secret": "s", "config_kwargs": {"read_timeout": 99, "retries": {"max_attempts": 9}}}
    fs, _ = remote.filesystem("s3://runs/a.safetensors", own)
    assert fs.config_kwargs["read_timeout"] == 99
    assert fs.config_kwargs["connect_timeout"] == remote.CONNECT_TIMEOUT
    assert fs.retries > 1  # the user's retries: s3fs's loops left as they are
    fs, _ = remote.filesystem("https://example.com/a.safetensors", {})
    assert fs.client_kwargs["timeout"].sock_read == remote.READ_TIMEOUT
    assert fs.client_kwargs["timeout"].total is None  # a slow download may take as long as it does
    fs, _ = remote.filesystem("https://example.com/a.safetensors", QUICK["http"])
    assert fs.client_kwargs["timeout"].sock_read == 1
