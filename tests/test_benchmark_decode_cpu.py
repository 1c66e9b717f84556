"""CPU checks of benchmarks/benchmark_decode.py: arguments, bandwidth and ratios, target
verdicts, and a whole --dry-run (made-up timings, no GPU) writing its JSON."""
import argparse
import json

import pytest

from script_loader import load_benchmark


@pytest.fixture(scope="module")
def bd():
    return load_benchmark("benchmark_decode")


def test_parse_args(bd):
    args = bd.parse_args([])
    assert args.shapes == [(1, 131072), (8, 32768), (32, 8192), (128, 2048)]
    assert args.methods == list(bd.METHODS) and (args.heads, args.kv_heads, args.head_dim) == (32, 8, 128)
    args = bd.parse_args(["--shapes", "2x64, 1x16", "--methods", "ours,sdpa_cudnn"])
    assert args.shapes == [(2, 64), (1, 16)] and args.methods == ["ours", "sdpa_cudnn"]
    with pytest.raises(argparse.ArgumentTypeError):
        bd._shape_list("8by2048")
    with pytest.raises(SystemExit):
        bd.parse_args(["--methods", "ours,nope"])


def test_bandwidth_and_ratios(bd):
    args = bd.parse_args(["--shapes", "2x1024"])
    row = bd.new_row(2, 1024, args)
    assert row["kv_bytes"] == 2 * 2 * 1024 * 8 * 128 * 2
    bd.record(row, "ours", lambda: 0.5)
    bd.record(row, "ours_paged16", lambda: 0.6)
    bd.record(row, "sdpa_cudnn", lambda: 0.4)
    bd.record(row, "sdpa_flash", lambda: 1 / 0)
    bd.finish_row(row)
    assert row["results"]["ours"]["tb_per_s"] == pytest.approx(row["kv_bytes"] / 0.5e-3 / 1e12)
    assert row["results"]["sdpa_flash"] == {"ms": None, "tb_per_s": None,
                                            "error": "ZeroDivisionError: division by zero"}
    assert row["ratios"]["ours/sdpa_cudnn"] == pytest.approx(0.8)
    assert row["ratios"]["ours_paged16/ours"] == pytest.approx(0.5 / 0.6)
    assert "ours_paged256/ours" not in row["ratios"]


def test_targets(bd):
    args = bd.parse_args([])

    def row(b, length, ours, paged16, paged256, cudnn):
        r = bd.new_row(b, length, args)
        for m, ms in (("ours", ours), ("ours_paged16", paged16), ("ours_paged256", paged256), ("sdpa_cudnn", cudnn)):
            bd.record(r, m, lambda ms=ms: ms)
        return bd.finish_row(r)

    rows = [row(1, 131072, 1.0, 1.05, 1.0, 1.0), row(8, 32768, 1.0, 1.2, 1.0, 0.9)]
    verdicts = {t["rule"]: t for t in bd.evaluate_targets(rows)}
    every = verdicts["ours >= 0.95x sdpa_cudnn at every shape"]
    assert every["status"] == "missed" and every["worst"]["ratio"] == pytest.approx(0.9)
    assert verdicts["ours >= 1.0x sdpa_cudnn at 1x131072"]["status"] == "met"
    assert verdicts["ours_paged16 within 10% of contiguous"]["status"] == "missed"
    assert verdicts["ours_paged256 within 10% of contiguous"]["status"] == "met"


def test_dry_run_writes_json(bd, tmp_path):
    assert bd.main(["--dry-run", "--shapes", "1x131072,8x2048", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("decode_*.json")
    doc = json.loads(path.read_text())
    assert [(r["batch"], r["cache_len"]) for r in doc["rows"]] == [(1, 131072), (8, 2048)]
    assert set(doc["rows"][0]["results"]) == set(bd.METHODS)
    assert doc["rows"][0]["results"]["sdpa_cudnn"]["tb_per_s"] == pytest.approx(2.8)
    assert {t["status"] for t in doc["targets"]} <= {"met", "missed", "not measured"}


def test_plot_from_json(bd, tmp_path):
    """The PNG is drawn from the JSON alone (--plot-json), as from a GPU run's committed file."""
    pytest.importorskip("matplotlib")
    assert bd.main(["--dry-run", "--shapes", "1x131072,8x2048", "--out-dir", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("decode_*.png")
    png.unlink()
    (path,) = tmp_path.glob("decode_*.json")
    assert bd.main(["--plot-json", str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 1000
