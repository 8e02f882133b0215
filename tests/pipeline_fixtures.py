"""Fixtures shared by the pipeline test modules: one Prefect test server per session, a local Ray per module.

A test module imports them with `from pipeline_fixtures import *  # noqa: F403` (pytest finds
fixtures in the module's namespace). A star import, because importing the names explicitly makes
ruff report every test parameter of that name as a redefinition of an unused import (F811).
tests/ is on sys.path: pytest's default "prepend" import mode inserts the folder of tests/conftest.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from app.raylocal import RAY_HOME_ENV, RayConnection, connect_ray

__all__ = ["local_ray", "prefect_api"]


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    """One Prefect test server per pytest session, started by the first module that asks (costs
    ~17-35 s here); every pipeline test module shares it through the config object."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    url = getattr(request.config, "_dynface_prefect_api_url", None)
    if url is None:
        stack = contextlib.ExitStack()
        stack.enter_context(prefect_test_harness(server_startup_timeout=180))
        request.session.addfinalizer(stack.close)
        url = prefect.settings.PREFECT_API_URL.value()
        request.config._dynface_prefect_api_url = url
    return url


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayConnection]:
    """A local Ray (2 CPUs) for this module, started with HOME at a bootstrap-config folder."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RAY_HOME_ENV, str(tmp_path_factory.mktemp("ray-home")))
        mp.delenv("RAY_ADDRESS", raising=False)
        conn = connect_ray(num_cpus=2)
        yield conn
        ray.shutdown()
