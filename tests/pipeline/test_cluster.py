"""The Ray executor on a real local Ray instance (started here with two CPUs, loopback only): byte-identical to a
single-process run, and a node that cannot see the source fails the run with a named error.

Skipped only where ray is not installed (it is an optional extra, `pip install 'lplr-convert[ray]'`).
"""

from __future__ import annotations

import os

import pytest

# Read when ray is first imported: a private instance on the loopback address, without usage reporting.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from executor_testing import run_like_reference

from lplr_convert.io.reader import SourceCheckpoint
from lplr_convert.pipeline.executors.cluster import RayExecutor, SourceNotVisibleError


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_a_local_ray_run_writes_the_same_bytes(local_ray, reference, tiny_llama_dir, tmp_path):
    opts = run_like_reference(reference, tiny_llama_dir, tmp_path / "out", "--ray-address", "local")
    assert opts["executor"] == "ray" and opts["threads"] == 1
    assert local_ray.is_initialized()  # the caller's connection is left open


def test_a_source_the_nodes_cannot_see_is_a_named_error(local_ray, tmp_path):
    gone = SourceCheckpoint(root=tmp_path / "not-shared", kind="safetensors", files=["model.safetensors"])
    executor = RayExecutor(gone, "local", ["cpu"], threads=1, retries=0)
    with pytest.raises(SourceNotVisibleError, match="not visible on Ray node .*shared filesystem"):
        executor.__enter__()


def test_a_running_cluster_passes_the_join_probe(local_ray):
    """The bounded join's HTTP/2 greeting (issue 24) is answered at once by a real cluster's GCS."""
    from lplr_convert.io.network import probe_address
    from lplr_convert.pipeline.executors.cluster import _H2_GREETING

    address = local_ray.get_runtime_context().gcs_address
    probe_address(address, "--ray-address", "no fix", greeting=_H2_GREETING)  # raises on no answer
