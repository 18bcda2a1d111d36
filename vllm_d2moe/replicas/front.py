"""A small load-balancing HTTP proxy: one port in front of several OpenAI servers.

Each request goes to the healthy replica with the fewest requests in flight;
responses stream through unchanged (server-sent events included), with an
``X-D2MoE-Replica`` header naming the replica. A replica that refuses the
connection is marked unhealthy and the request goes to the next one; a
background check of every replica's ``/health`` brings replicas back (or
takes them out) every few seconds. ``GET /health`` of the front answers 200
while at least one replica is healthy.
"""

import asyncio
import logging

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
# Hop-by-hop and framing headers: aiohttp sets its own for each leg.
_NOT_FORWARDED = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}


class LoadBalancer:
    def __init__(self, backends: list[str]):
        self.backends = backends
        self.in_flight = [0] * len(backends)
        self.healthy = [True] * len(backends)
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app):
        # No total timeout: generations may stream for minutes. Bytes pass through
        # as the replica sent them (no decompression).
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        checker = asyncio.create_task(self._check_health_forever())
        yield
        checker.cancel()
        await self.session.close()

    async def _check_health_forever(self):
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for i, url in enumerate(self.backends):
                try:
                    async with self.session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if ok != self.healthy[i]:
                    logger.warning("replica %d (%s) is %s", i, url, "healthy again" if ok else "unhealthy")
                self.healthy[i] = ok

    def _pick(self, tried: set[int]) -> int | None:
        candidates = [i for i, ok in enumerate(self.healthy) if ok and i not in tried]
        return min(candidates, key=lambda i: self.in_flight[i], default=None)

    async def health(self, request: web.Request) -> web.Response:
        status = 200 if any(self.healthy) else 503
        return web.json_response(
            {"healthy_replicas": sum(self.healthy), "replicas": len(self.backends)}, status=status
        )

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        tried: set[int] = set()
        while (replica := self._pick(tried)) is not None:
            tried.add(replica)
            self.in_flight[replica] += 1
            response = None
            try:
                async with self.session.request(
                    request.method, self.backends[replica] + str(request.rel_url), headers=headers, data=body
                ) as upstream:
                    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                    response.headers.update(
                        {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_FORWARDED}
                    )
                    response.headers["X-D2MoE-Replica"] = str(replica)
                    await response.prepare(request)
                    async for data in upstream.content.iter_any():
                        await response.write(data)
                    await response.write_eof()
                    return response
            except aiohttp.ClientConnectionError as e:
                if response is not None and response.prepared:
                    raise  # part of the answer is already out: nothing left to retry
                logger.warning("replica %d failed (%s); trying another", replica, e)
                self.healthy[replica] = False
            finally:
                self.in_flight[replica] -= 1
        return web.json_response({"error": "no healthy replica"}, status=503)


def run_front(backends: list[str], host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    web.run_app(LoadBalancer(backends).app(), host=host, port=port, print=None, access_log=None)
