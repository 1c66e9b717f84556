"""CPU checks of benchmarks/benchmark_linear.py: argument parsing, rows and the target's
verdict, and a whole --dry-run (made-up timings, no GPU) writing its JSON."""
import argparse
import json

import pytest

from script_loader import load_benchmark


@pytest.fixture(scope="module")
def bl():
    return load_benchmark("benchmark_linear")


def test_parse_args(bl):
    args = bl.parse_args([])
    assert args.shapes == [(8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 65536)]
    assert args.mode == ["fwd", "fwdbwd"] and args.ops == ["chunk_simple_gla", "chunk_retention", "chunk_gla"]
    args = bl.parse_args(["--shapes", "2x128, 1x64", "--mode", "fwd", "--ops", "all"])
    assert args.shapes == [(2, 128), (1, 64)] and args.mode == ["fwd"] and args.ops == list(bl.ALL_OPS)
    with pytest.raises(argparse.ArgumentTypeError):
        bl._shape_list("8by2048")
    with pytest.raises(SystemExit):
        bl.parse_args(["--ops", "chunk_nope"])


def test_rows_and_summary(bl):
    def row(op, mode, ours, fla, T=2048):
        r = bl.new_row(op, mode, 1, T, 16, 128)
        for side, ms in (("ours", ours), ("fla", fla)):
            bl.record(r, side, (lambda: 1 / 0) if ms is None else (lambda ms=ms: ms))
        return bl.finish_row(r)

    rows = [row("a", "fwd", 1.0, 2.0), row("a", "fwd", 1.0, 1.6, T=4096),
            row("b", "fwd", 1.0, 1.2), row("c", "fwd", None, 1.0), row("d", "fwd", 1.0, None)]
    assert rows[0]["speedup_vs_fla"] == 2.0
    assert rows[3]["results"]["ours"] == {"ms": None, "error": "ZeroDivisionError: division by zero"}
    summary = {s["op"]: s for s in bl.summarize(rows)}
    assert summary["a"]["status"] == "met" and summary["a"]["worst"] == {"B": 1, "T": 4096, "speedup": 1.6}
    assert summary["b"]["status"] == "missed"
    assert summary["c"]["status"] == "missed" and summary["c"]["ours_failed"] == 1
    assert summary["d"]["status"] == "not measured"


def test_dry_run_writes_json(bl, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_GIT_COMMIT", "abc123")
    lines = []
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--ops", "all"], log=lines.append)
    assert path == tmp_path / "linear_fwd-fwdbwd_dry-run_abc123.json"
    saved = json.loads(path.read_text())
    assert saved["commit"] == "abc123" and saved["dry_run"] and saved["env"]["device"] == "dry-run"
    assert {"benchmark", "env", "fla_version", "dtype", "heads", "head_dim", "shapes", "timing", "target",
            "results", "summary"} <= set(saved)
    assert len(saved["results"]) == 5 * (4 + 1) * 2  # 4 linear ops and the softmax crossover rows
    softmax = [r for r in saved["results"] if r["op"] == bl.SOFTMAX_OP]
    assert len(softmax) == 10 and all(r["results"]["ours"]["ms"] and "fla" not in r["results"] for r in softmax)
    assert bl.SOFTMAX_OP not in {s["op"] for s in saved["summary"]}
    simple = [r for r in saved["results"] if r["op"] == "chunk_simple_gla" and r["mode"] == "fwd"]
    assert all(r["speedup_vs_fla"] > 1.5 and r["rms_ratio_vs_fla"] is not None for r in simple)
    status = {(s["op"], s["mode"]): s["status"] for s in saved["summary"]}
    assert status[("chunk_retention", "fwdbwd")] == "met"
    assert status[("chunk_gla", "fwd")] == status[("chunk_gla", "fwdbwd")] == "met"
    gla = [r for r in saved["results"] if r["op"] == "chunk_gla"]
    assert len(gla) == 5 * 2 and all(r["results"]["ours"]["ms"] and r["results"]["fla"]["ms"] for r in gla)
    assert status[("chunk_simple_gla", "fwdbwd")] == "not measured"  # fla refuses in the dry run
    assert any("DRY RUN" in line for line in lines)


def test_decode_args(bl):
    args = bl.parse_args(["--mode", "decode"])
    assert args.mode == ["decode"] and args.batches == [1, 8, 32, 128] and args.decode_ops == list(bl.DECODE_OPS)
    args = bl.parse_args(["--mode", "all", "--batches", "4, 2", "--decode-ops", "fused_recurrent_gla"])
    assert args.mode == ["fwd", "fwdbwd", "decode"] and args.batches == [4, 2]
    assert args.decode_ops == ["fused_recurrent_gla"]
    assert "decode" not in bl.parse_args([]).mode  # the default run stays short
    with pytest.raises(argparse.ArgumentTypeError):
        bl._int_list("8,0")
    assert bl.state_bytes(8, 16, 128, 128) == 2 * 8 * 16 * 128 * 128 * 4


def test_dry_run_decode(bl, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_GIT_COMMIT", "abc123")
    fake_time = bl.FakeBench.time_ms

    def time_ms(self, side, op, mode):  # fla refusing one decode op, as it may on some Triton
        if side == "fla" and op == "fused_recurrent_retention":
            raise RuntimeError("fla refuses (test)")
        return fake_time(self, side, op, mode)

    monkeypatch.setattr(bl.FakeBench, "time_ms", time_ms)
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--mode", "decode"], log=lambda line: None)
    assert path == tmp_path / "linear_decode_dry-run_abc123.json"
    saved = json.loads(path.read_text())
    assert saved["modes"] == ["decode"] and saved["shapes"] == [] and saved["ops"] == []
    assert saved["decode"]["batches"] == [1, 8, 32, 128] and saved["decode"]["ops"] == list(bl.DECODE_OPS)
    assert saved["decode"]["reference"]["rows"] and "decode" in saved["timing"]["timed_region"]
    rows = saved["results"]
    assert len(rows) == 4 * 3 and {r["mode"] for r in rows} == {"decode"} and {r["T"] for r in rows} == {1}
    for r in rows:
        assert r["state_bytes"] == 2 * r["B"] * 16 * 128 * 128 * 4
        ours = r["results"]["ours"]
        assert ours["state_gbps"] == pytest.approx(r["state_bytes"] / (ours["ms"] * 1e-3) / 1e9)
        fla = r["results"]["fla"]
        if r["op"] == "fused_recurrent_retention":
            assert fla == {"ms": None, "error": "RuntimeError: fla refuses (test)", "state_gbps": None}
            assert r["speedup_vs_fla"] is None
        else:
            assert r["speedup_vs_fla"] == pytest.approx(fla["ms"] / ours["ms"]) and r["speedup_vs_fla"] > 1.5
            assert r["rms_ratio_vs_fla"] is not None
    status = {s["op"]: s["status"] for s in saved["summary"]}
    assert status == {"fused_recurrent_simple_gla": "met", "fused_recurrent_gla": "met",
                      "fused_recurrent_retention": "not measured"}


def test_dry_run_all_modes(bl, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_GIT_COMMIT", "abc123")
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--mode", "all", "--shapes", "1x64",
                         "--batches", "2"], log=lambda line: None)
    assert path.name == "linear_fwd-fwdbwd-decode_dry-run_abc123.json"
    modes = [r["mode"] for r in doc["results"]]
    assert modes.count("fwd") == modes.count("fwdbwd") == 3 + 1 and modes.count("decode") == 3  # + softmax
    assert doc["shapes"] == ["1x64"] and doc["decode"]["batches"] == [2]


def test_crossover(bl):
    def row(op, mode, T, ours):
        r = bl.new_row(op, mode, 1, T, 16, 128)
        bl.record(r, "ours", lambda: ours)
        return bl.finish_row(r)

    rows = [row("lin", "fwd", 2048, 1.0), row("lin", "fwd", 8192, 2.0), row(bl.SOFTMAX_OP, "fwd", 2048, 0.5),
            row(bl.SOFTMAX_OP, "fwd", 8192, 5.0), row("lin", "fwdbwd", 2048, 1.0)]
    (c,) = bl.crossover(rows)  # fwdbwd has no softmax row: no entry
    assert (c["op"], c["mode"], c["linear_faster_from_T"]) == ("lin", "fwd", 8192)
    assert [p["softmax_over_linear"] for p in c["points"]] == [0.5, 2.5]


def test_dry_run_without_softmax_and_plot(bl, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_GIT_COMMIT", "abc123")
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--no-softmax", "--shapes", "1x64"],
                        log=lambda line: None)
    assert "crossover" not in doc and all(r["op"] != bl.SOFTMAX_OP for r in doc["results"])
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--mode", "all", "--shapes", "2x64,1x256",
                         "--batches", "2"], log=lambda line: None)
    assert {c["mode"] for c in doc["crossover"]} == {"fwd", "fwdbwd"}
    pytest.importorskip("matplotlib")
    png = path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_grids(bl, tmp_path, monkeypatch):
    """--grid presets: fla-core's own op-benchmark grids set shapes, heads, head dim and ops
    (explicit --ops win), name the JSON file, and are recorded in it."""
    args = bl.parse_args([])
    assert args.grid is None and bl.grid_name(args) == "anchors"
    args = bl.parse_args(["--grid", "fla-gla"])
    assert args.shapes == [(16, 128 * 2 ** i) for i in range(8)] and (args.heads, args.head_dim) == (8, 128)
    assert args.ops == ["chunk_gla", "chunk_simple_gla", "chunk_retention"] and bl.grid_name(args) == "fla-gla"
    args = bl.parse_args(["--grid", "fla-retention", "--ops", "chunk_simple_gla"])
    assert args.shapes[-1] == (4, 16384) and args.head_dim == 256 and args.ops == ["chunk_simple_gla"]
    assert bl.grid_name(bl.parse_args(["--shapes", "2x64"])) == "custom"
    with pytest.raises(SystemExit):
        bl.parse_args(["--grid", "nope"])
    monkeypatch.setenv("FLASH_ATTN_GIT_COMMIT", "abc123")
    doc, path = bl.main(["--dry-run", "--out-dir", str(tmp_path), "--grid", "fla-retention", "--mode", "fwd",
                         "--no-softmax"], log=lambda _: None)
    assert path == tmp_path / "linear_fla-retention_fwd_dry-run_abc123.json"
    saved = json.loads(path.read_text())
    assert saved["grid"] == "fla-retention" and saved["head_dim"] == 256 and len(saved["results"]) == 8
