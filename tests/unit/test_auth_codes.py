"""What the interceptor answers a caller it cannot identify (found by review): a missing token is UNAUTHENTICATED.

On a plaintext listener with a tenants file (`insecure` and `tenants_file`), a call without a token resolved to the
anonymous principal, which `denial()` refused as a non-client: PERMISSION_DENIED, "... is for clients; anonymous
(plaintext) may call only NodeService" (which it may not either). A client library retries UNAUTHENTICATED with
credentials and reports PERMISSION_DENIED as a missing role; the status said the wrong thing and the message lied.
"""

from __future__ import annotations

import hashlib

import grpc
import pytest

from controlplane.api import auth
from controlplane.api.interceptor import AuthInterceptor
from controlplane.api.tenantsfile import Tenants

TOKEN = "tenant-a-token-0123456789"
METHODS = ("/gpumesh.v1.SliceService/List", "/gpumesh.v1.SliceService/Allocate", "/gpumesh.v1.AdminService/CordonNode",
           "/gpumesh.v1.NodeService/Register")


class Aborted(Exception):
    pass


class Ctx:
    def __init__(self, token: str = "") -> None:
        self.md = (("authorization", f"Bearer {token}"),) if token else ()

    def auth_context(self):
        return {}

    def invocation_metadata(self):
        return self.md

    async def abort(self, code, details=""):
        raise Aborted(code, details)


def _authenticator(insecure: bool) -> auth.Authenticator:
    tenants = Tenants(tokens={hashlib.sha256(TOKEN.encode()).hexdigest():
                                   auth.Principal("client", "a-client", "team-a", "tenant")}, quotas={"team-a": {}})
    return auth.Authenticator(tenants, insecure=insecure)


def _interceptor(insecure: bool) -> AuthInterceptor:
    return AuthInterceptor(_authenticator(insecure))


@pytest.mark.parametrize("insecure", [True, False])
@pytest.mark.parametrize("method", METHODS)
async def test_a_call_without_a_token_is_unauthenticated(insecure, method):
    with pytest.raises(Aborted) as e:
        await _interceptor(insecure)._admit(method, None, Ctx())
    code, message = e.value.args
    assert code == grpc.StatusCode.UNAUTHENTICATED, message
    assert "authorization: Bearer <token>" in message
    assert "may call only NodeService" not in message


@pytest.mark.parametrize("insecure", [True, False])
async def test_a_wrong_token_is_unauthenticated_and_a_known_one_admitted(insecure):
    i = _interceptor(insecure)
    with pytest.raises(Aborted) as e:
        await i._admit(METHODS[0], None, Ctx("not-the-token-0123456789"))
    assert e.value.args[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await i._admit(METHODS[0], None, Ctx(TOKEN))).tenant == "team-a"
    with pytest.raises(Aborted) as e:           # a known caller without the role: PERMISSION_DENIED naming it
        await i._admit("/gpumesh.v1.AdminService/CordonNode", None, Ctx(TOKEN))
    assert e.value.args[0] == grpc.StatusCode.PERMISSION_DENIED and "needs the admin role" in e.value.args[1]


@pytest.mark.parametrize("value", ["Basic dXNlcjpwdw==", TOKEN, "Bearer ", "Bearer"])
def test_a_malformed_authorization_names_the_form_in_words_of_both_grpc_and_http(value):
    """The same check answers gRPC metadata and the web view's HTTP header: it said "authorization metadata", which
    names nothing an HTTP client sends. It names the form, and never echoes what was sent (a bare token)."""
    with pytest.raises(Exception) as e:
        _authenticator(True).from_authorization(value)
    message = str(e.value)
    assert "metadata" not in message and "'Bearer <token>'" in message and "authorization" in message
    assert TOKEN not in message and "dXNlcjpwdw" not in message
