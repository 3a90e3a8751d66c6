"""The consortium's only public address: hospitals' Fleet API, nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``, ``flwr log``) and the Runtime API on one HTTP port, and Control has no authentication
unless Flower Enterprise's OIDC plugin is installed: anyone who can reach the port with ``ca.crt``
could register a node or start a run whose app reads the hospitals' data. ``medvlm-fl superlink``
therefore binds the SuperLink to the coordinator's loopback address (``127.0.0.1:<control-port>``,
where only the coordinator's own ``flwr`` reaches it) and puts this gateway on the public address:
it forwards ``/v1/fleet/*`` (node authentication is checked by the SuperLink behind it: the signed
headers pass through unchanged) and refuses every other path with 403 and the reason, in its reply
and its log.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from pathlib import Path
from typing import Optional

log = logging.getLogger("medvlm.server")

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


def refusal(path: str, control: str) -> str:
    return (f"{path}: this address serves hospitals' SuperNodes only (Fleet API). Starting runs, registering "
            f"nodes and reading logs (Control API) are served only on the coordinator's own host ({control}).")


def create_gateway(upstream: str, *, ca: Optional[Path], control: str):
    """A Starlette app that forwards Fleet API requests to ``upstream`` (``https://127.0.0.1:PORT``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    verify = ssl.create_default_context(cafile=str(ca)) if ca else False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(None, connect=10))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX):
            peer = request.client.host if request.client else "?"
            log.warning("gateway refused %s %s from %s: not the Fleet API", request.method, path, peer)
            return PlainTextResponse(refusal(path, control), status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream_response = await client.request(request.method, path, params=request.query_params,
                                                     headers=headers, content=await request.body())
        except httpx.TransportError as err:   # the SuperLink is (re)starting: 503 makes SuperNodes retry
            log.warning("gateway: the SuperLink at %s is not answering (%s): 503 to %s", upstream,
                        type(err).__name__, path)
            return PlainTextResponse(f"the SuperLink behind this gateway is not answering ({type(err).__name__}); "
                                     "retry", status_code=503)
        out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(upstream_response.content, status_code=upstream_response.status_code, headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve_gateway(*, host: str, port: int, upstream: str, control: str, certs: Optional[Path]) -> None:
    """Run the gateway in this process (blocks). With ``certs``: TLS with the SuperLink's own
    certificate, and the upstream checked against the consortium CA."""
    import uvicorn

    app = create_gateway(upstream, ca=certs / "ca.crt" if certs else None, control=control)
    log.info("gateway on %s:%d: Fleet API -> %s; Control API only on %s", host, port, upstream, control)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                ssl_certfile=str(certs / "server.pem") if certs else None,
                ssl_keyfile=str(certs / "server.key") if certs else None)
