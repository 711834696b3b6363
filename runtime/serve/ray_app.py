"""persense-serve on Ray Serve: the same FastAPI app in N replicas, each holding one EngineSet (one PerSense per
precision), behind Ray Serve's HTTP proxy.

Reference ids are reference-cache keys, so replicas share references through the cache folder: put
`--cache-dir` on a filesystem every node mounts and any replica segments with an id another one created
(docs/RAY.md, "Serving"). Ray Serve is imported only here, when `persense-serve --ray` asks for it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from persense.runtime.datasets.ray_batch import connect, import_ray
from persense.runtime.errors import PersenseError
from persense.runtime.serve.app import Limits, create_app
from persense.runtime.serve.engines import EngineOptions, EngineSet

APP_NAME = "persense"


def import_serve() -> ModuleType:
    """ray.serve, or a user error that says how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise PersenseError(f"--ray needs Ray Serve: pip install 'ray[serve]' ({exc})") from exc
    return serve


class Replica:
    """One Ray Serve replica: its own engines, opened once, serving the persense app."""

    def __init__(self, options: EngineOptions, limits: Limits) -> None:
        self.engines = EngineSet(options)
        self.limits = limits

    def __serve_build_asgi_app__(self) -> Any:
        """The app Ray Serve's ingress runs in this replica (called after __init__)."""
        return create_app(self.engines, self.limits)


def application(options: EngineOptions, limits: Limits, replicas: int) -> Any:
    """The bound Ray Serve application: `replicas` copies of Replica, each reserving `options.threads` CPUs."""
    serve = import_serve()
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="PerSense",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": options.threads or 1},
    )
    return deployment.bind(options, limits)


def run(options: EngineOptions, limits: Limits, replicas: int, address: str, host: str, port: int) -> Any:
    """Join (or start) a Ray cluster, start Ray Serve's proxy on host:port and deploy; returns ray.serve."""
    ray = import_ray()
    serve = import_serve()
    if not ray.is_initialized():
        connect(ray, address, replicas, options.threads or 1)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(options, limits, replicas), name=APP_NAME, route_prefix="/")
    return serve
