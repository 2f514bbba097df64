"""Bearer-token authentication with scopes, as a gRPC server interceptor.

Tokens come from a file (``avatar serve --tokens-file F``) or the ``AVATAR_TOKENS`` environment
variable, in one format: entries separated by newlines or ``;``, each ``TOKEN=SCOPE[,SCOPE...]``
(``#`` starts a comment). Scopes: ``render``, ``onboard``, ``admin`` (admin allows everything).

Every RPC except the standard health service needs ``authorization: Bearer <token>``:
missing -> UNAUTHENTICATED; unknown token or a token without the method's scope -> PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import grpc

from avatar.errors import InvalidInput

SCOPES = ("render", "onboard", "admin")
ENV_VAR = "AVATAR_TOKENS"

#: scope each avatar.v1 method needs; methods not listed (e.g. reflection) need any valid token
METHOD_SCOPES = {
    "/avatar.v1.AvatarService/ListAvatars": "render",
    "/avatar.v1.AvatarService/GetAvatar": "render",
    "/avatar.v1.AvatarService/Render": "render",
    "/avatar.v1.AvatarService/StreamRender": "render",
    "/avatar.v1.AvatarService/Onboard": "onboard",
    "/avatar.v1.AvatarService/GetJob": "onboard",
    "/avatar.v1.AvatarService/WatchJob": "onboard",
    "/avatar.v1.AvatarService/CancelJob": "onboard",
    "/avatar.v1.AvatarService/ListJobs": "onboard",
}
PUBLIC_PREFIX = "/grpc.health.v1.Health/"


def parse_tokens(text: str, source: str = "tokens") -> dict[str, frozenset[str]]:
    """Parse ``TOKEN=SCOPE,SCOPE`` entries (newline- or ``;``-separated) into {token: scopes}.

    Raises:
        InvalidInput: an entry without ``=``, an unknown scope, or a token shorter than 16 characters.
    """
    tokens: dict[str, frozenset[str]] = {}
    for line in text.replace(";", "\n").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        token, sep, scopes = line.partition("=")
        token = token.strip()
        names = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        if not sep or not names:
            raise InvalidInput(
                f"{source}: entry {line[:8]!r}... must be TOKEN=SCOPE[,SCOPE]; scopes: {', '.join(SCOPES)}"
            )
        bad = names - set(SCOPES)
        if bad:
            raise InvalidInput(f"{source}: unknown scope(s) {sorted(bad)}; valid: {', '.join(SCOPES)}")
        if len(token) < 16:
            raise InvalidInput(
                f"{source}: token {token[:4]!r}... is shorter than 16 characters; use e.g. `openssl rand -hex 24`"
            )
        tokens[token] = names
    return tokens


def load_tokens(tokens_file: str | Path | None = None) -> dict[str, frozenset[str]]:
    """Tokens from ``tokens_file`` and/or ``$AVATAR_TOKENS`` (both are merged).

    The file must not be accessible to other users nor writable by the group (mode 0600 or 0640),
    like ssh's private keys: anyone who can read it can act as every client.

    Raises:
        InvalidInput: the file is missing, too open, unparsable, or no token is configured at all.
    """
    tokens: dict[str, frozenset[str]] = {}
    if tokens_file:
        path = Path(tokens_file)
        if not path.is_file():
            raise InvalidInput(f"tokens file {path} not found; create it with lines TOKEN=SCOPE[,SCOPE]")
        mode = path.stat().st_mode & 0o777
        if mode & 0o037:
            raise InvalidInput(
                f"tokens file {path} has mode {mode:04o}: other users can read or change the API "
                f"tokens; run `chmod 600 {path}`"
            )
        tokens.update(parse_tokens(path.read_text(), str(path)))
    if os.environ.get(ENV_VAR):
        tokens.update(parse_tokens(os.environ[ENV_VAR], f"${ENV_VAR}"))
    if not tokens:
        raise InvalidInput(
            f"no API tokens configured: pass --tokens-file F or set {ENV_VAR} "
            "(entries TOKEN=SCOPE[,SCOPE], scopes render/onboard/admin)"
        )
    return tokens


def token_id(token: str) -> str:
    """A short non-secret id of a token for logs (first 8 hex digits of its SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, before=None
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that fails with ``code``
    (after calling ``before(context)`` if given)."""

    def unary(request_or_iterator, context):
        if before is not None:
            before(context)
        context.abort(code, message)

    def streaming(request_or_iterator, context):
        if before is not None:
            before(context)
        context.abort(code, message)
        yield  # pragma: no cover  (makes this a generator; abort raises)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and scope of every call except ``grpc.health.v1.Health``.

    Args:
        tokens: {token: scopes} from :func:`load_tokens`.
        on_denied: optional callback ``(method, code_name, peer, token or None)`` for metrics and the
            access log, called when a refused call runs (log a :func:`token_id`, never the token).
    """

    def __init__(self, tokens: dict[str, frozenset[str]], on_denied=None):
        self._tokens = dict(tokens)
        self._on_denied = on_denied

    def _lookup(self, token: str) -> frozenset[str] | None:
        found = None
        for known, scopes in self._tokens.items():  # constant-time compare against every token
            if hmac.compare_digest(known.encode(), token.encode()):
                found = scopes
        return found

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIX):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return self._deny(
                handler,
                method,
                token,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        scopes = self._lookup(token)
        if scopes is None:
            return self._deny(
                handler,
                method,
                token,
                grpc.StatusCode.PERMISSION_DENIED,
                "unknown token: ask the server operator for a valid API token",
            )
        need = METHOD_SCOPES.get(method)
        if need and need not in scopes and "admin" not in scopes:
            return self._deny(
                handler,
                method,
                token,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token lacks the '{need}' scope needed for {method.rsplit('/', 1)[-1]}",
            )
        return handler

    def _deny(self, handler, method, token, code, message):
        def before(context):
            if self._on_denied:
                try:
                    self._on_denied(method, code.name, context.peer(), token)
                except Exception:  # logging must never turn a denial into INTERNAL
                    pass

        return _abort_handler(handler, code, message, before)
