"""Reduced-precision syncs (localsgd.sync_precision): the codec's arithmetic, and DiLoCo runs against float32."""

from __future__ import annotations

import pytest
import torch
from conftest import finish, model_bytes, read_summary, small_config, write_config

from localsgd_ft.config import ConfigError, parse_config
from localsgd_ft.training.precision import BLOCK, block_scales, decode_int8, encode_int8, int8_levels


def _groups(n: int, shape=(3, 5, 40)) -> list:
    g = torch.Generator().manual_seed(n)
    values = [torch.randn(shape, generator=g) * (1 + i) for i in range(n)]
    values[0].view(-1)[:BLOCK] = 0  # a block that is zero in one group
    return values


@pytest.mark.parametrize("groups", [2, 3, 8])
def test_int8_means_are_within_half_a_level_of_every_block_and_the_sum_cannot_overflow(groups):
    values = _groups(groups)
    scales = torch.stack([block_scales(v) for v in values]).amax(dim=0)  # what the MAX allreduce agrees on
    levels = int8_levels(groups)
    wires = [encode_int8(v, scales, levels) for v in values]
    assert all(w.dtype == torch.int8 and int(w.abs().max()) <= levels for w in wires)
    wide = sum(w.to(torch.int32) for w in wires)
    summed = sum(wires[1:], wires[0].clone())  # the sum in int8, as gloo takes it
    assert torch.equal(summed.to(torch.int32), wide) and int(wide.abs().max()) <= 127
    mean = decode_int8(summed, scales, levels, groups, values[0])
    exact = torch.stack(values).mean(dim=0)
    assert mean.shape == exact.shape and mean.dtype == torch.float32
    per_value = scales.repeat_interleave(BLOCK)[:exact.numel()].view(exact.shape) / (2 * levels)
    assert bool(((mean - exact).abs() <= per_value * 1.0001 + 1e-7).all())
    assert (mean - exact).abs().max() > 0  # it is rounded: the bound above is what holds, not equality


def test_int8_sends_a_quarter_of_the_bytes_plus_a_scale_per_block():
    values = torch.randn(1000)  # not a multiple of the block: the last one is padded for the arithmetic
    wire, scales = encode_int8(values, block_scales(values), 63), block_scales(values)
    assert wire.numel() == 1000 and scales.numel() == -(-1000 // BLOCK)  # the padding is not sent
    assert (wire.numel() + 4 * scales.numel()) / (4 * values.numel()) < 0.26


def test_int8_is_refused_with_more_groups_than_its_levels_can_share():
    base = {"localsgd": {"algorithm": "diloco", "sync_precision": "int8"}}
    assert parse_config({**base, "replica_groups": {"count": 31}}).localsgd.sync_precision == "int8"
    with pytest.raises(ConfigError, match="use sync_precision: bfloat16, or at most 31 groups"):
        parse_config({**base, "replica_groups": {"count": 32}})


def _wire_bytes(cfg: dict, precision: str) -> int:
    """Bytes one sync of the whole model hands to allreduce in ``precision`` (DiLoCo: one call per parameter)."""
    from localsgd_ft.training.model import build_model

    sizes = [p.numel() for p in build_model(parse_config(cfg).model).parameters()]
    if precision == "bfloat16":
        return 2 * sum(sizes)
    blocks = [-(-n // BLOCK) for n in sizes]
    return sum(n + 4 * b for n, b in zip(sizes, blocks))


@pytest.mark.integration
def test_reduced_precision_syncs_train_like_float32_with_fewer_bytes(tmp_path, cifar_root, torchx_run):
    """float32, bfloat16 and int8 DiLoCo runs on the same data: the same accuracy within a point, a half and
    about a quarter of the bytes, every group's weights identical."""
    results = {}
    for precision in ("float32", "bfloat16", "int8"):
        cfg = small_config(tmp_path / precision, cifar_root, localsgd={
            "algorithm": "diloco", "sync_every": 10, "sync_precision": precision},
            train={"max_steps": 200, "eval_every": 0})
        path = write_config(tmp_path, cfg, f"{precision}.yaml")
        run = torchx_run(path)
        assert finish(run, path) == 0, run.tail()
        summary = read_summary(cfg)
        assert summary["succeeded"] and summary["params_identical"], summary["failure_reason"]
        results[precision] = summary
        full = model_bytes(cfg)
        for g in summary["replica_groups"].values():
            assert g["syncs_committed"] == 20
            assert g["sync_bytes"] == 20 * (full if precision == "float32" else _wire_bytes(cfg, precision))
    full = results["float32"]["replica_groups"]["0"]["sync_bytes"]
    assert results["bfloat16"]["replica_groups"]["0"]["sync_bytes"] <= 0.5 * full
    assert results["int8"]["replica_groups"]["0"]["sync_bytes"] <= 0.3 * full
    reference = results["float32"]["final_test_accuracy"]
    assert reference > 0.5
    for precision in ("bfloat16", "int8"):
        assert abs(results[precision]["final_test_accuracy"] - reference) <= 0.01, \
            {p: s["final_test_accuracy"] for p, s in results.items()}
    # Rounding changes the result: a precision that silently sent float32 would give float32's weights.
    hashes = {p: s["replica_groups"]["0"]["params_sha256"] for p, s in results.items()}
    assert len(set(hashes.values())) == 3, hashes
