"""Shared test setup: Triton's interpreter and hypothesis profiles."""

import os

# Triton reads TRITON_INTERPRET when it is first imported: import it here, with the variable set, before
# any test can import it with the variable unset.
os.environ.setdefault("TRITON_INTERPRET", "1")
import cvg.threads  # noqa: E402

cvg.threads.configure()  # before torch loads: cvg's threading policy, as the entry points apply it

try:
    import triton  # noqa: F401
except ImportError:  # the triton tests skip themselves
    pass

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("default")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """A random tiny WanPipeline with the real MiniLM text encoder (shared: tests must not modify it)."""
    from cvg.models.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe):
    path = tmp_path_factory.mktemp("models") / "tiny-wan"
    tiny_pipe.save_pretrained(str(path))
    return path
