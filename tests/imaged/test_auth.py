"""Basic auth (htpasswd) and bearer tokens (a token server) against real docker-registry instances."""

from __future__ import annotations

import base64
import json

import pytest

from shared.errors import Unauthenticated
from tests.support.registry import PASSWORD, USERNAME


def ref_on(reg, pushed) -> str:
    return f"{reg.host}/{pushed.repo}:{pushed.tag}"


async def test_basic_registry_refuses_anonymous_pull(make_imaged, basic_registry, catalog):
    imaged = await make_imaged(basic_registry.host)
    ref = ref_on(basic_registry, catalog.busybox)
    with pytest.raises(Unauthenticated) as e:
        await imaged.pull(reference=ref)
    assert ref in e.value.message and basic_registry.host in e.value.message


@pytest.mark.parametrize("auth", [
    {"username": USERNAME, "password": PASSWORD},
    {"auth": base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()},
])
async def test_basic_auth_from_cri_auth_config(make_imaged, basic_registry, catalog, auth):
    imaged = await make_imaged(basic_registry.host)
    result = await imaged.pull(reference=ref_on(basic_registry, catalog.busybox), auth=auth)
    assert result["image_id"] == catalog.busybox.config_digest


async def test_basic_auth_wrong_password(make_imaged, basic_registry, catalog):
    imaged = await make_imaged(basic_registry.host)
    with pytest.raises(Unauthenticated) as e:
        await imaged.pull(reference=ref_on(basic_registry, catalog.busybox),
                          auth={"username": USERNAME, "password": "wrong"})
    assert "refused" in e.value.message


async def test_basic_auth_from_auth_file(make_imaged, basic_registry, catalog, tmp_path):
    auth_file = tmp_path / "auth.json"
    token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    # The repository-specific entry wins over the registry-wide (wrong) one.
    auth_file.write_text(json.dumps({"auths": {
        basic_registry.host: {"auth": base64.b64encode(b"nobody:wrong").decode()},
        f"{basic_registry.host}/test/busybox": {"auth": token},
    }}))
    imaged = await make_imaged(basic_registry.host, global_auth_file=str(auth_file))
    result = await imaged.pull(reference=ref_on(basic_registry, catalog.busybox))
    assert result["image_id"] == catalog.busybox.config_digest
    with pytest.raises(Unauthenticated):
        await imaged.pull(reference=ref_on(basic_registry, catalog.multi))


async def test_bearer_token_with_credentials_is_cached_per_scope(make_imaged, token_registry, catalog):
    imaged = await make_imaged(token_registry.host)
    ts = token_registry.token_server
    auth = {"username": USERNAME, "password": PASSWORD}
    before = ts.issued
    await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth=auth)
    after_first = ts.issued
    assert after_first == before + 1
    # Same repository, same credentials: the cached token is reused.
    await imaged.pull(reference=f"{token_registry.host}/test/busybox:alias", auth=auth)
    assert ts.issued == after_first
    # Another repository is another scope: a new token.
    await imaged.pull(reference=ref_on(token_registry, catalog.multi), auth=auth)
    assert ts.issued == after_first + 1
    scopes = [r["query"].get("scope") for r in ts.requests[-2:] if r["method"] == "GET"]
    assert ["repository:test/multilayer:pull"] in scopes


async def test_bearer_token_refused_without_credentials(make_imaged, token_registry, catalog):
    imaged = await make_imaged(token_registry.host)
    with pytest.raises(Unauthenticated) as e:
        await imaged.pull(reference=ref_on(token_registry, catalog.busybox))
    assert token_registry.host in e.value.message


async def test_bearer_token_wrong_password(make_imaged, token_registry, catalog):
    imaged = await make_imaged(token_registry.host)
    with pytest.raises(Unauthenticated):
        await imaged.pull(reference=ref_on(token_registry, catalog.busybox),
                          auth={"username": USERNAME, "password": "nope"})


async def test_identity_token_is_exchanged_at_the_realm(make_imaged, token_registry, catalog):
    ts = token_registry.token_server
    refresh = ts.add_refresh_token(USERNAME)
    imaged = await make_imaged(token_registry.host)
    result = await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth={"identity_token": refresh})
    assert result["image_id"] == catalog.busybox.config_digest
    posts = [r for r in ts.requests if r["method"] == "POST"]
    assert posts and posts[-1]["form"]["grant_type"] == ["refresh_token"]
    assert posts[-1]["form"]["scope"] == ["repository:test/busybox:pull"]


async def test_registry_token_is_used_as_is(make_imaged, token_registry, catalog):
    ts = token_registry.token_server
    token = ts.issue(USERNAME, ["repository:test/busybox:pull"])
    requests_before = len(ts.requests)
    imaged = await make_imaged(token_registry.host)
    result = await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth={"registry_token": token})
    assert result["image_id"] == catalog.busybox.config_digest
    assert len(ts.requests) == requests_before  # the token server was never asked


async def test_registry_token_for_another_repository_is_refused(make_imaged, token_registry, catalog):
    token = token_registry.token_server.issue(USERNAME, ["repository:other/thing:pull"])
    imaged = await make_imaged(token_registry.host)
    with pytest.raises(Unauthenticated):
        await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth={"registry_token": token})


async def test_token_refused_by_the_registry_is_replaced(make_imaged, token_registry, catalog):
    """A cached token the registry no longer accepts (revoked, clock skew) is fetched again once."""
    ts = token_registry.token_server
    imaged = await make_imaged(token_registry.host)
    auth = {"username": USERNAME, "password": PASSWORD}
    await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth=auth)
    issued = ts.issued
    for token in imaged.puller.tokens._tokens.values():
        token.value = ts.issue("someone-else", ["repository:elsewhere:pull"])
    issued_for_test = ts.issued - issued
    result = await imaged.pull(reference=ref_on(token_registry, catalog.busybox), auth=auth)
    assert result["image_id"] == catalog.busybox.config_digest
    assert ts.issued == issued + issued_for_test + 1
