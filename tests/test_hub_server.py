"""The Hub test double refuses what the Hub refuses, so a client bug cannot pass the push tests by accident:
unsigned or corrupted LFS uploads, commits naming LFS objects never uploaded, stale parent commits, writes
without a token or to another user's repo. Raw HTTP (urllib), so the client's own checks are not in the way."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import pytest

from tests.hub_server import HubServer

TOKEN = "hf_alice"


def call(hub, method, path, body=None, token=TOKEN, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(hub.endpoint + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path, {TOKEN: "alice", "hf_bob": "bob"}) as server:
        assert call(server, "POST", "/api/repos/create", {"name": "m", "organization": "alice"})[0] == 200
        yield server


def commit(hub, lines, token=TOKEN):
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return call(hub, "POST", "/api/models/alice/m/commit/main", body, token, "application/x-ndjson")


def test_lfs_upload_needs_the_signed_url_and_the_right_content(hub):
    data = b"weights" * 100
    oid = hashlib.sha256(data).hexdigest()
    status, body = call(hub, "POST", "/alice/m.git/info/lfs/objects/batch",
                        {"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    path = href.removeprefix(hub.endpoint)
    assert call(hub, "PUT", path.split("?")[0] + "?sig=forged", data, token=None)[0] == 403
    assert call(hub, "PUT", path, data + b"!", token=None)[0] == 400  # sha256 mismatch
    header = {"key": "header", "value": {"summary": "add"}}
    lfs = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": oid, "size": len(data)}}
    assert commit(hub, [header, lfs])[0] == 422  # never uploaded
    assert call(hub, "PUT", path, data, token=None)[0] == 200
    assert commit(hub, [header, lfs])[0] == 200
    assert hub.files("alice/m")["w.safetensors"] == data


def test_commits_need_the_owner_and_the_current_parent(hub):
    add = {"key": "file", "value": {"path": "a.txt", "content": "aGk=", "encoding": "base64"}}
    assert commit(hub, [{"key": "header", "value": {"summary": "x"}}, add], token=None)[0] == 401
    assert commit(hub, [{"key": "header", "value": {"summary": "x"}}, add], token="hf_bob")[0] == 403
    assert commit(hub, [{"key": "header", "value": {"summary": "x"}}, add], token="hf_wrong")[0] == 401
    stale = hub.repos["alice/m"].branches["main"]
    assert commit(hub, [{"key": "header", "value": {"summary": "x"}}, add])[0] == 200
    assert commit(hub, [{"key": "header", "value": {"summary": "y", "parentCommit": stale}}, add])[0] == 412
    assert hub.files("alice/m")["a.txt"] == b"hi"
    assert call(hub, "POST", "/api/repos/create", {"name": "m", "organization": "bob"})[0] == 403
