"""One tensor's job: the packed form round-trips every dtype and shape exactly, and a job gives the same stored bytes
and record as the method itself."""

from __future__ import annotations

import torch

from lplr_convert.io.manifest import TensorRecord
from lplr_convert.io.writer import tensor_bytes
from lplr_convert.methods import make_settings
from lplr_convert.pipeline.task import JobResult, TensorJob, pack_result, run_job, unpack_result
from lplr_convert.pipeline.plan import TensorPlan


def test_pack_round_trips_awkward_parts_exactly():
    gen = torch.Generator().manual_seed(0)
    stored = {
        "w.lplr_left.packed": torch.randint(0, 255, (7, 3), generator=gen, dtype=torch.uint8),  # odd byte count
        "w.lplr_left.scale": torch.randn(3, generator=gen),
        "w.bf16": torch.randn(5, 2, generator=gen).bfloat16(),
        "w.ids": torch.arange(3, dtype=torch.int64),
        "w.empty": torch.zeros(0, 4, dtype=torch.float16),
        "w.scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    rec = TensorRecord("w", [7, 3], "float32", "copy", seconds=0.5, settings={"method": "copy"})
    header, buf = pack_result(JobResult("w", stored, rec))
    back = unpack_result(header, buf)
    assert list(back.stored) == list(stored) and back.record == rec
    for k, t in stored.items():
        assert back.stored[k].dtype == t.dtype and back.stored[k].shape == t.shape
        assert bytes(tensor_bytes(back.stored[k])) == bytes(tensor_bytes(t))
    assert all(start % 8 == 0 for _, _, _, start, _ in header["parts"])


def test_a_job_stores_what_the_method_stores():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(24, 16, generator=gen).half()
    settings = make_settings("lsvd", rank_fraction=0.5)
    plan = TensorPlan("model.layers.0.mlp.up_proj.weight", (24, 16), torch.float16, settings, False, 0, "fc_up", "x")
    res = run_job(TensorJob(plan, 3, "error", "estimate"), W, torch.device("cpu"))
    assert res.record.rank == 8 and res.record.method == "lsvd"
    assert res.record.spectrum["kind"] == "svd" and res.record.spectrum["exact_to"] == 0.5
    again = run_job(TensorJob(plan, 3, "error", "off"), W, torch.device("cpu"))
    assert again.record.spectrum is None
    assert all(torch.equal(res.stored[k], again.stored[k]) for k in res.stored)  # the spectrum changes no byte
